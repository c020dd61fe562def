"""The shipped models: ONNX Runtime and torch agree on both branches; they evaluate with no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoder.checkpoint import WEIGHTS_DIR, load_checkpoint, resolve_model_path
from encoder.export import DOMAINS, export_onnx, max_onnx_torch_difference

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
