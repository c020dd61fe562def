"""Fixtures of the services tests: a tiny real model, real sketchy100 photos, an embedded store under tmp."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from encoder.embedder import Embedder, load_embedder
from services.config import Settings, get_settings
from services.gallery import Gallery, open_gallery
from services.vector_store import VectorStore, open_store
from tests.services.gallery_support import build_tiny_model, copy_photos

CATEGORIES = ("ant", "ape", "apple")
PER_CATEGORY = 8


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny64.pt"
    build_tiny_model(path, dim=64, seed=1)
    return path


@pytest.fixture(scope="session")
def tiny_embedder(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return load_embedder(str(tiny_model), cache_dir=tmp_path_factory.mktemp("onnx"))


@pytest.fixture
def photos_dir(tmp_path: Path, sketchy: Path) -> Path:
    """24 real photos: 8 of each of 3 categories, in <dir>/<category>/ (`sketchy` skips without the data)."""
    folder = tmp_path / "photos"
    copy_photos(folder, CATEGORIES, PER_CATEGORY)
    return folder


@pytest.fixture
def settings(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Embedded store and file job records under tmp, the tiny model, no broker; the cached settings reset."""
    import os

    for key in list(os.environ):
        if key.startswith("SKETCHSEARCH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SKETCHSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SKETCHSEARCH_MODEL", str(tiny_model))
    monkeypatch.setenv("SKETCHSEARCH_BATCH_SIZE", "8")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def store(settings: Settings) -> Iterator[VectorStore]:
    opened = open_store(settings)
    yield opened
    opened.close()


@pytest.fixture
def gallery(store: VectorStore, tiny_embedder: Embedder) -> Gallery:
    return open_gallery(store, tiny_embedder, create=True)
