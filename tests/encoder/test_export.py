"""The shipped models: ONNX Runtime and torch agree on both branches; they evaluate with no network."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from encoder.checkpoint import WEIGHTS_DIR, load_checkpoint, resolve_model_path
from encoder.embedder import Embedder
from encoder.errors import ModelLoadError
from encoder.export import DOMAINS, EXPORT_VERSION, export_onnx, max_onnx_torch_difference
from encoder.model import ModelConfig, build_model

SHIPPED = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))


def test_the_default_is_shipped_and_trained_with_the_training_defaults() -> None:
    from encoder.train import TrainConfig

    assert resolve_model_path("default").stem in SHIPPED
    ckpt = load_checkpoint("default")
    # `sketchsearch train` with no flags must retrain what ships (trunk, size, mirroring, whitening, the join)
    defaults = TrainConfig()
    assert ckpt.config.arch == defaults.model and ckpt.config.embed_dim == defaults.embed_dim
    assert ckpt.train_config.get("mirror_pairs") == defaults.mirror_pairs
    assert ckpt.train_config.get("whiten_power") == defaults.whiten_power
    assert ckpt.train_config.get("epochs") == defaults.epochs
    assert ckpt.config.pooled_weight == defaults.pooled_weight
    assert ckpt.config.pooled_dims == defaults.pooled_dims


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_small_and_self_describing(name: str) -> None:
    path = resolve_model_path(name)
    assert path.stat().st_size <= 40 * 1024 * 1024
    ckpt = load_checkpoint(name)
    assert ckpt.config.arch.startswith("lite")
    assert ckpt.preprocessing.image_size == ckpt.config.image_size
    assert ckpt.threshold is not None
    assert ckpt.metrics.get("validation")


@pytest.mark.parametrize("name", SHIPPED)
def test_onnx_and_torch_agree_within_1e4(name: str, tmp_path: Path) -> None:
    ckpt = load_checkpoint(name)
    model = ckpt.build()
    size = ckpt.preprocessing.image_size
    rng = np.random.default_rng(0)
    inputs = rng.uniform(-1, 1, size=(5, 3, size, size)).astype(np.float32)
    for domain in DOMAINS:
        path = export_onnx(model, domain, size, 3, tmp_path / f"{domain}.onnx")
        assert max_onnx_torch_difference(model, domain, path, inputs) < 1e-4


def _inputs(size: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, size=(n, 3, size, size)).astype(np.float32)


def test_a_truncated_cached_graph_is_exported_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = load_checkpoint("sketchsearch-lite0")
    first = Embedder(ckpt, backend="onnx", cache_dir=tmp_path, threads=1)
    cached = tmp_path / f"{ckpt.model_id}-sketch-x{EXPORT_VERSION}.onnx"
    whole = cached.stat().st_size
    cached.write_bytes(cached.read_bytes()[: whole // 3])  # as a crash or a full disk would leave it
    with caplog.at_level(logging.WARNING, logger="encoder.embedder"):
        second = Embedder(ckpt, backend="onnx", cache_dir=tmp_path, threads=1)
    assert "exporting it again" in caplog.text
    assert cached.stat().st_size == whole
    x = _inputs(ckpt.preprocessing.image_size)
    for domain in DOMAINS:
        assert np.allclose(second.embed_arrays(x, domain), first.embed_arrays(x, domain), atol=1e-6)


def test_a_cached_graph_that_stays_broken_is_a_model_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = load_checkpoint("sketchsearch-lite0")
    for domain in DOMAINS:
        (tmp_path / f"{ckpt.model_id}-{domain}-x{EXPORT_VERSION}.onnx").write_bytes(b"not a graph")

    def broken_export(model: nn.Module, domain: str, size: int, channels: int, path: Path) -> Path:
        path.write_bytes(b"still not a graph")  # an export that keeps writing an unloadable file
        return path

    monkeypatch.setattr("encoder.embedder.export_onnx", broken_export)
    with pytest.raises(ModelLoadError, match="does not load even when exported again"):
        Embedder(ckpt, backend="onnx", cache_dir=tmp_path, threads=1)


def test_two_threads_exporting_the_same_model_into_one_folder_both_succeed(tmp_path: Path) -> None:
    ckpt = load_checkpoint("sketchsearch-lite0")
    size = ckpt.preprocessing.image_size
    path = tmp_path / "cache" / "photo.onnx"
    models = [ckpt.build(), ckpt.build()]  # two embedders of one model, as two services would hold
    start = threading.Barrier(len(models))
    results: list[Path | BaseException] = []

    def export(model: nn.Module) -> None:
        start.wait()
        try:
            results.append(export_onnx(model, "photo", size, 3, path))
        except BaseException as exc:  # reported to the test thread below
            results.append(exc)

    threads = [threading.Thread(target=export, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [path, path]
    assert [p.name for p in path.parent.iterdir()] == ["photo.onnx"]  # no temporary file left beside it
    assert max_onnx_torch_difference(models[0], "photo", path, _inputs(size)) < 1e-4


class _Drifting(nn.Module):
    """A model whose output depends on Python state that tracing freezes: its export cannot match torch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def embed(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1)[:, :4] * self.calls


def test_an_export_that_disagrees_with_torch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sketch.onnx"
    with pytest.raises(ModelLoadError, match="differs from torch"):
        export_onnx(_Drifting(), "sketch", 8, 3, path)
    assert list(tmp_path.iterdir()) == []  # neither the graph nor its temporary file is left to be trusted


def test_an_export_that_fails_is_a_model_load_error(tmp_path: Path) -> None:
    model = build_model(ModelConfig(image_size=64, embed_dim=16)).eval()
    with pytest.raises(ModelLoadError, match="export of the photo branch failed"):
        export_onnx(model, "photo", 8, 3, tmp_path / "photo.onnx")  # far below the size the model is built for
    assert list(tmp_path.iterdir()) == []
