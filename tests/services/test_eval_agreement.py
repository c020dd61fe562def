"""The platform's search gives the numbers `sketchsearch eval` gives: the same model, the same gallery."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoder.checkpoint import resolve_model_path
from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.embedder import Embedder, load_embedder
from encoder.errors import ModelLoadError
from encoder.evaluate import evaluate_dataset
from services.gallery import open_gallery
from services.ingest import PhotoFile, ingest_files
from services.search import search_sketch
from services.vector_store import VectorStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _acc_at_10_through_the_store(store: VectorStore, embedder: Embedder, root: Path) -> tuple[int, int]:
    data = load_dataset(root).subset(categories=set(HELD_OUT_CATEGORIES))
    gallery = open_gallery(store, embedder, create=True)
    summary = ingest_files(gallery, [PhotoFile(p.path, p.category) for p in data.photos], batch_size=64)
    assert summary.failed == 0 and summary.added == len(data.photos)
    photo_paths = {(p.category, p.stem): str(p.path.resolve()) for p in data.photos}
    found = queries = 0
    for sketch in data.sketches:
        own = photo_paths.get((sketch.category, sketch.photo_stem))
        if own is None:
            continue
        queries += 1
        found += own in {str(Path(h.path).resolve()) for h in search_sketch(gallery, sketch.path, top_k=10)}
    return found, queries


def _check(store: VectorStore, embedder: Embedder, root: Path) -> None:
    # the store blends gallery vectors photo by photo as batches arrive; eval blends the whole gallery at once
    assert store.neighbours > 0
    report = evaluate_dataset(root, embedder, categories=set(HELD_OUT_CATEGORIES), neighbours=store.neighbours)
    found, queries = _acc_at_10_through_the_store(store, embedder, root)
    assert queries == report.instance.queries == 250
    expected = round(report.instance.acc[10] * queries)
    # eval counts a tie with the own photo against the query, the store may order it either way
    assert abs(found - expected) <= 1, f"search found {found}/{queries}, eval says {expected}/{queries}"


def test_held_out_top10_matches_eval_tiny_model(
    store: VectorStore, tiny_embedder: Embedder, sketchy: Path
) -> None:
    _check(store, tiny_embedder, sketchy)


@pytest.mark.e2e
def test_held_out_top10_matches_eval_shipped_model(store: VectorStore, sketchy: Path, tmp_path: Path) -> None:
    try:
        resolve_model_path("default")
    except ModelLoadError:
        pytest.skip("the shipped default model (encoder/weights/) is not there yet")
    _check(store, load_embedder("default", cache_dir=tmp_path / "onnx"), sketchy)
