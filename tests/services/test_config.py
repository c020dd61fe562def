"""Settings: defaults, the SKETCHSEARCH_ prefix, the cached getter and `sketchsearch config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.config import Settings, get_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SKETCHSEARCH_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()


def test_defaults_are_embedded_and_in_process(clean_env: None) -> None:
    s = Settings()
    assert s.home == Path(".sketchsearch")
    assert s.qdrant_url is None and s.embedded
    assert s.broker_url is None
    assert s.model == "default"
    assert s.store_path == Path(".sketchsearch/qdrant")


def test_environment_with_prefix_and_empty_means_unset(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKETCHSEARCH_HOME", "/srv/gallery")
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("SKETCHSEARCH_QDRANT_URL", "")
    monkeypatch.setenv("SKETCHSEARCH_BATCH_SIZE", "16")
    monkeypatch.setenv("BATCH_SIZE", "999")  # without the prefix: not ours
    s = Settings()
    assert s.home == Path("/srv/gallery")
    assert s.broker_url == "redis://127.0.0.1:6379/3"
    assert s.qdrant_url is None
    assert s.batch_size == 16


def test_getter_is_cached_until_cleared(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("SKETCHSEARCH_MODEL", "/models/other.pt")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().model == "/models/other.pt"
    get_settings.cache_clear()


def test_invalid_value_is_refused(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("SKETCHSEARCH_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_config_command_prints_effective_settings(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SKETCHSEARCH_HOME", str(tmp_path))
    monkeypatch.setenv("SKETCHSEARCH_QDRANT_API_KEY", "s3cret")
    result = CliRunner().invoke(app, ["config", "--json"])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["home"] == str(tmp_path.resolve())
    assert "embedded store at" in shown["qdrant_url"]
    assert "in-process" in shown["broker_url"]
    assert "s3cret" not in result.output
    text = CliRunner().invoke(app, ["config"]).output
    get_settings.cache_clear()
    assert "SKETCHSEARCH_MODEL" in text and "SKETCHSEARCH_BROKER_URL" in text


def test_a_bad_variable_is_a_config_error_naming_it(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.errors import ConfigError

    monkeypatch.setenv("SKETCHSEARCH_BATCH_SIZE", "0")
    monkeypatch.setenv("SKETCHSEARCH_GALLERY_NEIGHBOURS", "five")
    with pytest.raises(ConfigError) as caught:
        get_settings()
    assert "SKETCHSEARCH_BATCH_SIZE" in str(caught.value) and "SKETCHSEARCH_GALLERY_NEIGHBOURS" in str(caught.value)
    result = CliRunner().invoke(app, ["stats"])
    assert result.exit_code == 2 and "SKETCHSEARCH_BATCH_SIZE" in result.output
    get_settings.cache_clear()
