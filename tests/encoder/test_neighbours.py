"""Gallery vectors blended with their nearest photos, on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from encoder import neighbours
from encoder.neighbours import NeighbourIndex, blend_gallery, blend_neighbours, nearest_others


def _unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_one_neighbour_by_hand() -> None:
    photos = _unit([1, 0, 0], [1, 1, 0], [0, 0, 1])
    c = float(np.sqrt(0.5))  # cosine of photo 0 and photo 1
    got = blend_gallery(photos, k=1)
    # photo 0's nearest other is photo 1 (cosine c), weighted c**3; photo 2's nearest is at cosine 0: weight 0
    want0 = photos[0] + c**3 * photos[1]
    assert np.allclose(got[0], want0 / np.linalg.norm(want0), atol=1e-6)
    want1 = photos[1] + c**3 * photos[0]
    assert np.allclose(got[1], want1 / np.linalg.norm(want1), atol=1e-6)
    assert np.allclose(got[2], photos[2], atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_zero_neighbours_and_tiny_galleries_change_nothing() -> None:
    photos = _unit([1, 0], [0, 1], [1, 1])
    assert np.array_equal(blend_gallery(photos, k=0), photos)
    assert np.array_equal(blend_gallery(photos[:1], k=5), photos[:1])
    # k beyond the gallery: every other photo is a neighbour, and the result is still unit length
    assert np.allclose(np.linalg.norm(blend_gallery(photos, k=10), axis=1), 1.0, atol=1e-6)


def test_negative_cosines_weigh_nothing() -> None:
    own = _unit([1, 0])
    out = blend_neighbours(own, _unit([-1, 0.1])[None], np.array([[-0.99]], dtype=np.float32))
    assert np.allclose(out, own, atol=1e-6)


def test_nearest_others_never_returns_the_photo_itself() -> None:
    photos = _unit([1, 0], [1, 0.1], [0, 1])
    index, scores = nearest_others(photos, photos, k=2, exclude=np.arange(3))
    assert index.tolist() == [[1, 2], [0, 2], [1, 0]]
    assert np.all(scores[:, 0] >= scores[:, 1])


def test_chunks_give_the_same_answer_as_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    photos = rng.normal(size=(50, 6)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    whole = blend_gallery(photos, k=4)
    monkeypatch.setattr(neighbours, "_CHUNK", 7)
    assert np.allclose(blend_gallery(photos, k=4), whole, atol=1e-6)


def test_blending_pulls_a_category_together() -> None:
    # two categories of photos along two axes, with one photo of category a that strays toward b
    a = _unit([1, 0.2], [1, -0.2], [1, 0.1], [0.55, 0.45])
    b = _unit([0.2, 1], [-0.2, 1], [0.1, 1])
    photos = np.concatenate([a, b])
    query = _unit([0.5, 0.5])[0]  # ambiguous
    before = photos @ query
    after = blend_gallery(photos, k=2) @ query
    # the stray photo (index 3) is pulled toward its own category's direction, away from the query's middle
    assert after[3] < before[3]


def test_index_adds_in_any_batches_to_the_whole_gallery_blend() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    photos = centres[rng.integers(0, 5, size=200)] + 0.7 * rng.normal(size=(200, 16))
    photos = (photos / np.linalg.norm(photos, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"p{i}" for i in range(200)]
    index = NeighbourIndex(k=5, dim=16)
    current: dict[str, np.ndarray] = {}
    order = rng.permutation(200)
    for start in range(0, 200, 13):
        rows = order[start : start + 13]
        changed, vectors = index.add([ids[i] for i in rows], photos[rows])
        assert changed[: len(rows)] == [ids[i] for i in rows]  # the written photos first
        current.update(zip(changed, vectors, strict=True))
    want = blend_gallery(photos, 5)
    assert np.allclose(np.stack([current[i] for i in ids]), want, atol=1e-5)
    # writing a photo again changes nothing of anyone's blend, and reports only that photo
    changed, vectors = index.add([ids[7]], photos[7:8])
    assert changed == [ids[7]] and np.allclose(vectors[0], want[7], atol=1e-5)
    with pytest.raises(ValueError):
        NeighbourIndex(k=0, dim=16)
