"""Gallery neighbours: each photo's vector blended with its nearest photos' (database-side augmentation)."""

from __future__ import annotations

import numpy as np

# Weight of a neighbour = its cosine to the photo to this power (Radenovic et al.'s alpha-QE weighting): near
# duplicates count almost fully, loosely related photos hardly at all.
BLEND_POWER = 3.0
# Rows of the similarity matrix computed at once by blend_gallery: bounds memory to ~chunk x gallery floats.
_CHUNK = 1024


def blend_neighbours(
    vectors: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, power: float = BLEND_POWER
) -> np.ndarray:
    """Each photo's gallery vector: normalise(own vector + sum of its neighbours' vectors x max(score, 0)^power).

    vectors (n, d): the photos' own unit embeddings; neighbours (n, k, d): their k nearest other photos' own
    embeddings; scores (n, k): the cosines to them. k may be 0 (the vectors come back unchanged)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if neighbours.shape[1] == 0:
        return vectors.copy()
    weights = np.clip(np.asarray(scores, dtype=np.float32), 0.0, None) ** power
    blended = vectors + np.einsum("nk,nkd->nd", weights, np.asarray(neighbours, dtype=np.float32))
    norms = np.linalg.norm(blended, axis=1, keepdims=True)
    return (blended / np.maximum(norms, 1e-12)).astype(np.float32)


def nearest_others(
    queries: np.ndarray, gallery: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) and cosines (n, k) of each query's k most similar gallery rows, best first; row exclude[i]
    (the query itself) is never its own neighbour. Which of two rows tied at the k-th place is kept is not
    specified (neither is it in Qdrant)."""
    sim = queries @ gallery.T
    if exclude is not None:
        sim[np.arange(len(queries)), exclude] = -np.inf
    k = min(k, gallery.shape[0] - (1 if exclude is not None else 0))
    if k <= 0:
        return np.zeros((len(queries), 0), dtype=int), np.zeros((len(queries), 0), dtype=sim.dtype)
    if k < sim.shape[1]:
        # the k best of each row first (linear time), then only those sorted
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(sim.shape[1]), sim.shape).copy()
    scores = np.take_along_axis(sim, part, axis=1)
    order = np.take_along_axis(part, np.argsort(-scores, axis=1, kind="stable"), axis=1)
    return order, np.take_along_axis(sim, order, axis=1)


def blend_gallery(photos: np.ndarray, k: int, power: float = BLEND_POWER) -> np.ndarray:
    """The gallery vectors of a whole gallery at once (what the vector store keeps up to date photo by photo):
    each photo blended with its k nearest other photos. k = 0 returns the embeddings unchanged."""
    photos = np.asarray(photos, dtype=np.float32)
    if k <= 0 or len(photos) < 2:
        return photos.copy()
    return _blend_rows(photos, np.arange(len(photos)), k, power)[0]


def _blend_rows(photos: np.ndarray, rows: np.ndarray, k: int, power: float) -> tuple[np.ndarray, np.ndarray]:
    """The gallery vectors of photos[rows] within all of photos, and each one's floor: the cosine of its k-th
    nearest other photo (-inf with fewer than k others, so that any photo added later is a neighbour)."""
    out = np.empty((len(rows), photos.shape[1]), dtype=np.float32)
    floors = np.full(len(rows), -np.inf, dtype=np.float32)
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        index, scores = nearest_others(photos[chunk], photos, k, exclude=chunk)
        out[start : start + len(chunk)] = blend_neighbours(photos[chunk], photos[index], scores, power)
        if scores.shape[1] == k:
            floors[start : start + len(chunk)] = scores[:, -1]
    return out, floors


class NeighbourIndex:
    """Every photo embedding of one gallery in memory, with the cosine of each photo's k-th nearest other photo
    (its floor): adding photos says exactly which gallery vectors change and what they become. A photo's
    neighbours change only when a new photo scores at or above its floor, so an add costs one new x all product,
    not a gallery x gallery one."""

    def __init__(self, k: int, dim: int, power: float = BLEND_POWER) -> None:
        if k < 1:
            raise ValueError(f"a neighbour index needs k >= 1, not {k}")
        self.k = k
        self.power = power
        self.ids: list[str] = []
        self._row: dict[str, int] = {}
        self.vectors = np.zeros((0, dim), dtype=np.float32)
        self.floors = np.zeros(0, dtype=np.float32)

    def add(self, ids: list[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Add (or overwrite, by id) photos; returns the ids whose gallery vectors are new or changed, the added
        ones first, and those gallery vectors."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
        fresh: list[int] = []
        for pid in ids:
            if pid not in self._row:
                self._row[pid] = len(self.ids)
                fresh.append(len(self.ids))
                self.ids.append(pid)
        old = len(self.vectors)
        self.vectors = np.concatenate([self.vectors, np.zeros((len(fresh), self.vectors.shape[1]), np.float32)])
        self.floors = np.concatenate([self.floors, np.full(len(fresh), -np.inf, np.float32)])
        rows = np.array([self._row[pid] for pid in ids], dtype=int)
        # the photos that are new or whose vector changed: only they can enter other photos' neighbours
        moved = (rows >= old) | (np.abs(self.vectors[rows] - vectors).max(axis=1) > 1e-6)
        # where an overwritten photo was: the photos that had it as a neighbour may lose it
        probes = np.concatenate([vectors[moved], self.vectors[rows[moved & (rows < old)]]])
        self.vectors[rows] = vectors
        written = list(dict.fromkeys(int(r) for r in rows))
        others: set[int] = set()
        if old and len(probes):
            # an existing photo's neighbours change when a probe reaches its floor
            # (a margin: this product may round the k-th cosine differently from the one that set the floor)
            reach = (self.vectors[:old] @ probes.T).max(axis=1) >= self.floors[:old] - 1e-5
            others.update(int(r) for r in np.flatnonzero(reach))
        order = np.array(written + sorted(others.difference(written)), dtype=int)
        blended, self.floors[order] = _blend_rows(self.vectors, order, self.k, self.power)
        return [self.ids[r] for r in order], blended
