"""The shipped model: ONNX Runtime and torch agree on both branches; it evaluates with no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint, resolve_model_path
from encoder.export import DOMAINS, export_onnx, max_onnx_torch_difference


def test_shipped_model_is_small_and_self_describing() -> None:
    path = resolve_model_path("default")
    assert path.stat().st_size <= 40 * 1024 * 1024
    ckpt = load_checkpoint("default")
    assert ckpt.config.arch.startswith("lite")
    assert ckpt.preprocessing.image_size == ckpt.config.image_size
    assert ckpt.threshold is not None
    assert ckpt.metrics.get("validation")


def test_onnx_and_torch_agree_within_1e4(tmp_path: Path) -> None:
    ckpt = load_checkpoint("default")
    model = ckpt.build()
    size = ckpt.preprocessing.image_size
    rng = np.random.default_rng(0)
    inputs = rng.uniform(-1, 1, size=(5, 3, size, size)).astype(np.float32)
    for domain in DOMAINS:
        path = export_onnx(model, domain, size, 3, tmp_path / f"{domain}.onnx")
        assert max_onnx_torch_difference(model, domain, path, inputs) < 1e-4
