"""Whitening of trained embeddings: a centring and a linear map fitted on training embeddings, shipped in the model.

A metric-learned embedding spends most of its variance on a few directions (the category term pulls same-category
images together), so cosine similarity is dominated by them. Whitening (Jegou and Chum, 2012; Radenovic et al.,
2018) rescales every principal direction towards unit variance, which lets the finer directions that tell one
instance from another count. `power` 0.5 is full whitening and 0 none; `shrink` adds a share of the mean
eigenvalue to every eigenvalue, so that directions of almost no variance are not blown up.
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
