"""Search by sketch and by stored photo: top-k, threshold, category, the CLI's JSON, agreement with eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from encoder.errors import EmptySketchError
from services.cli import app
from services.config import Settings, get_settings
from services.gallery import Gallery, read_model_identity
from services.ingest import collect_photos, ingest_files
from services.search import find_similar, read_stats, search_sketch
from services.vector_store import GALLERY_VECTOR, PHOTO_VECTOR

pytestmark = pytest.mark.integration


@pytest.fixture
def filled(gallery: Gallery, photos_dir: Path) -> Gallery:
    files, _ = collect_photos([photos_dir])
    ingest_files(gallery, files, batch_size=8)
    return gallery


@pytest.fixture
def sketch(sketchy: Path) -> Path:
    return sorted((sketchy / "sketch" / "ant").glob("*.png"))[0]


def _all_scores(gallery: Gallery, vector: np.ndarray) -> dict[str, float]:
    """Cosine of a query to every stored gallery vector (what search ranks by), computed here."""
    points, _ = gallery.store.client.scroll(gallery.collection, limit=1000, with_vectors=[GALLERY_VECTOR])
    scores = {}
    for p in points:
        assert isinstance(p.vector, dict)  # named vectors
        scores[str(p.id)] = float(np.dot(vector, np.asarray(p.vector[GALLERY_VECTOR])))
    return scores


def test_top_k_is_the_k_best_in_order(filled: Gallery, sketch: Path) -> None:
    hits = search_sketch(filled, sketch, top_k=5)
    assert len(hits) == 5
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    expected = _all_scores(filled, filled.embedder.embed_sketch(sketch))
    best = sorted(expected.values(), reverse=True)[:5]
    assert np.allclose(scores, best, atol=1e-4)
    assert len(search_sketch(filled, sketch)) == 10  # the default


def test_threshold_returns_exactly_the_photos_at_or_above_it(filled: Gallery, sketch: Path) -> None:
    expected = _all_scores(filled, filled.embedder.embed_sketch(sketch))
    ranked = sorted(expected.values(), reverse=True)
    cut = (ranked[6] + ranked[7]) / 2  # between the 7th and 8th best: 7 photos qualify
    hits = search_sketch(filled, sketch, threshold=cut)
    assert len(hits) == 7 and all(h.score >= cut for h in hits)
    assert {h.id for h in hits} == {i for i, s in expected.items() if s >= cut}
    assert len(search_sketch(filled, sketch, threshold=-1.0)) == 24  # no top-k cap
    assert len(search_sketch(filled, sketch, threshold=-1.0, max_hits=20)) == 20
    with pytest.raises(ValueError):
        search_sketch(filled, sketch, top_k=3, threshold=0.5)


def test_category_filter(filled: Gallery, sketch: Path) -> None:
    hits = search_sketch(filled, sketch, top_k=20, category="ape")
    assert len(hits) == 8 and {h.category for h in hits} == {"ape"}


def test_empty_sketch_is_refused(filled: Gallery, tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 200), 255).save(blank)
    with pytest.raises(EmptySketchError):
        search_sketch(filled, blank)


def test_similar_excludes_the_photo_itself(filled: Gallery, photos_dir: Path) -> None:
    photo = sorted((photos_dir / "apple").glob("*.jpg"))[0]
    by_file = find_similar(filled, str(photo), top_k=23)
    assert len(by_file) == 23 and str(photo.resolve()) not in {h.path for h in by_file}
    by_id = find_similar(filled, by_file[0].id, top_k=3)
    assert by_file[0].id not in {h.id for h in by_id}
    # the stored photo queries with its own embedding against the gallery vectors, as a sketch would
    own = filled.store.read_vectors(filled.collection, [by_file[0].id], PHOTO_VECTOR)[0]
    expected = sorted((v for i, v in _all_scores(filled, own).items() if i != by_file[0].id), reverse=True)[:3]
    assert np.allclose([h.score for h in by_id], expected, atol=1e-4)


def test_stats_counts_the_active_collection(filled: Gallery, settings: Settings) -> None:
    stats = read_stats(filled.store, read_model_identity(settings))
    assert stats.photos == 24 and stats.model == filled.model_id
    assert stats.collection == filled.collection
    assert stats.categories == {"ant": 8, "ape": 8, "apple": 8}


def test_cli_search_similar_and_stats_json(settings: Settings, photos_dir: Path, sketch: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["stats", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout)["photos"] == 0
    nothing = runner.invoke(app, ["search", str(sketch)])
    assert nothing.exit_code == 2 and "sketchsearch ingest" in nothing.output
    assert runner.invoke(app, ["ingest", str(photos_dir)]).exit_code == 0

    result = runner.invoke(app, ["search", str(sketch), "--top-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 4 and all(set(h) == {"id", "path", "score", "category"} for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    cut = hits[1]["score"] - 1e-6
    above = json.loads(runner.invoke(app, ["search", str(sketch), "--threshold", str(cut), "--json"]).stdout)
    assert [h["id"] for h in above] == [h["id"] for h in hits[:2]]
    only = json.loads(runner.invoke(app, ["search", str(sketch), "--category", "ant", "--json"]).stdout)
    assert {h["category"] for h in only} == {"ant"}
    both = runner.invoke(app, ["search", str(sketch), "--top-k", "3", "--threshold", "0.5"])
    assert both.exit_code == 2 and "not both" in both.output  # a usage error, not a crash (exit 1)
    zero = runner.invoke(app, ["search", str(sketch), "--top-k", "0"])
    assert zero.exit_code == 2 and "at least 1" in zero.output

    similar = json.loads(runner.invoke(app, ["similar", hits[0]["id"], "-k", "3", "--json"]).stdout)
    assert len(similar) == 3 and hits[0]["id"] not in {h["id"] for h in similar}
    missing = runner.invoke(app, ["similar", "00000000-0000-0000-0000-000000000000"])
    assert missing.exit_code == 2 and "no photo" in missing.output

    # the embedded store blends exactly as photos arrive: reblending finds nothing to rewrite
    reblend = runner.invoke(app, ["reblend"])
    assert reblend.exit_code == 0 and "0 of 24 gallery vectors blended again" in reblend.output

    stats = json.loads(runner.invoke(app, ["stats", "--json"]).stdout)
    get_settings.cache_clear()
    assert set(stats) == {"photos", "model", "collection", "categories"}
    assert stats["photos"] == 24 and stats["categories"] == {"ant": 8, "ape": 8, "apple": 8}


def test_other_dimension_model_is_refused_with_the_fix(
    settings: Settings, photos_dir: Path, sketch: Path, tiny_model_64: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(photos_dir)]).exit_code == 0
    monkeypatch.setenv("SKETCHSEARCH_MODEL", str(tiny_model_64))
    get_settings.cache_clear()
    result = runner.invoke(app, ["search", str(sketch)])
    get_settings.cache_clear()
    assert result.exit_code == 2
    assert "128-dimensional" in result.output and "SKETCHSEARCH_MODEL" in result.output
    assert "Traceback" not in result.output
