"""Shared fixtures: where the shared data lives, and skips with a reason where it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sketchy100").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (a user's machine): skipping data-backed test")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sketchy(shared_data: Path) -> Path:
    return shared_data / "sketchy100"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real checkpoint (the seed architecture, 128-d) that embeds in milliseconds."""
    from tests.services.gallery_support import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny128.pt"
    build_tiny_model(path, dim=128)
    return path


@pytest.fixture(autouse=True)
def _home_outside_the_repo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands a test runs without a HOME of its own (eval's ONNX exports, say) write under a temporary one,
    never into ./.sketchsearch of the checkout; fixtures that set their own replace it."""
    from services.config import get_settings

    monkeypatch.setenv("SKETCHSEARCH_HOME", str(tmp_path_factory.mktemp("home")))
    get_settings.cache_clear()
