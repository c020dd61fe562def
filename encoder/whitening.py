"""Statistics fitted on training images after training and shipped in the model: whitening, the pooled join.

A metric-learned embedding spends most of its variance on a few directions (the category term pulls same-category
images together), so cosine similarity is dominated by them. Whitening (Jegou and Chum, 2012; Radenovic et al.,
2018) rescales every principal direction towards unit variance, which lets the finer directions that tell one
instance from another count. `power` 0.5 is full whitening and 0 none; `shrink` adds a share of the mean
eigenvalue to every eigenvalue, so that directions of almost no variance are not blown up.

The pooled join (`fit_pooled_join`) goes the other way. The fine-tuned trunk's final pooled vector still ranks
unseen photos by category well (photo->photo mAP 0.75 on the held-out categories); the mid-level taps beside it
and the head, trained for exact matches, give much of that up (0.60 and 0.66, docs/BENCHMARKS.md). So that
vector, centred on its own domain's mean, is joined to the embedding at a weight.
"""

from __future__ import annotations

import numpy as np


def fit_whitening(
    sketches: np.ndarray, photos: np.ndarray, power: float, shrink: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, matrix) from embeddings of both domains: whitened = normalise((x - mean) @ matrix).

    Both domains are pooled with equal weight, so that the map is the same for a sketch and a photo and a sketch
    still meets its photo where the model put them.
    """
    if len(sketches) < 2 or len(photos) < 2:
        raise ValueError("whitening needs at least two embeddings of each domain")
    if sketches.shape[1] != photos.shape[1]:
        raise ValueError(f"sketch and photo embeddings differ in width: {sketches.shape[1]} and {photos.shape[1]}")
    if power < 0 or shrink < 0:
        raise ValueError("whitening power and shrink must not be negative")
    s = sketches.astype(np.float64)
    p = photos.astype(np.float64)
    mean = 0.5 * (s.mean(axis=0) + p.mean(axis=0))
    cov = 0.5 * (np.cov(s - mean, rowvar=False, bias=True) + np.cov(p - mean, rowvar=False, bias=True))
    # np.cov centres each domain on its own mean; add back the spread between the two domain means
    for m in (s.mean(axis=0) - mean, p.mean(axis=0) - mean):
        cov += 0.5 * np.outer(m, m)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.clip(evals, 0.0, None)
    scale = (evals + shrink * evals.mean() + 1e-12) ** -power
    matrix = (evecs * scale) @ evecs.T
    # the scale of the matrix does not change a cosine; keep its values near 1 for fp16 storage
    matrix /= np.abs(matrix).max()
    return mean.astype(np.float32), matrix.astype(np.float32)


def fit_pooled_join(
    sketches: np.ndarray, photos: np.ndarray, dims: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(photo mean, sketch mean, basis or None) from the trunk's pooled vectors of training images.

    Each domain is centred on its own mean: the trunk puts sketches and photos apart, and what the join should
    compare is where an image lies within its domain. With `dims`, the basis holds the top principal directions
    of both centred domains (equal weight), to store shorter vectors.
    """
    if len(sketches) < 2 or len(photos) < 2:
        raise ValueError("the pooled join needs at least two vectors of each domain")
    if sketches.shape[1] != photos.shape[1]:
        raise ValueError(f"sketch and photo vectors differ in width: {sketches.shape[1]} and {photos.shape[1]}")
    if not 0 <= dims <= sketches.shape[1]:
        raise ValueError(f"pooled dims must be 0 (all) to {sketches.shape[1]}, not {dims}")
    s = sketches.astype(np.float64)
    p = photos.astype(np.float64)
    s_mean, p_mean = s.mean(axis=0), p.mean(axis=0)
    basis = None
    if dims:
        cov = 0.5 * (np.cov(s - s_mean, rowvar=False, bias=True) + np.cov(p - p_mean, rowvar=False, bias=True))
        evals, evecs = np.linalg.eigh(cov)
        basis = evecs[:, np.argsort(evals)[::-1][:dims]].astype(np.float32)
    return p_mean.astype(np.float32), s_mean.astype(np.float32), basis
