"""Sketch BatchNorm statistics (AdaBN): photos are untouched, sketches get their own, the export keeps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from encoder.export import export_onnx
from encoder.model import DomainBatchNorm, EfficientNetLite, ModelConfig, SketchPhotoEncoder, build_model
from encoder.train import estimate_sketch_norm, sketch_norm_digest


def _pair() -> tuple[SketchPhotoEncoder, SketchPhotoEncoder]:
    torch.manual_seed(0)
    plain = build_model(ModelConfig(image_size=64, embed_dim=16))
    dual = build_model(ModelConfig(image_size=64, embed_dim=16, sketch_norm=True))
    state = plain.state_dict()
    for name, module in dual.named_modules():  # start the sketch statistics from the photo ones
        if isinstance(module, DomainBatchNorm):
            state[f"{name}.sketch_mean"] = state[f"{name}.running_mean"].clone()
            state[f"{name}.sketch_var"] = state[f"{name}.running_var"].clone()
    dual.load_state_dict(state)
    assert isinstance(plain, SketchPhotoEncoder) and isinstance(dual, SketchPhotoEncoder)
    return plain.eval(), dual.eval()


def test_sketch_statistics_change_sketches_only() -> None:
    plain, dual = _pair()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.embed(x, "sketch"), dual.embed(x, "sketch"))
    before = sketch_norm_digest(dual, 11)
    # bright, low-contrast inputs, like white paper with a few strokes
    estimate_sketch_norm(dual, [torch.rand(6, 3, 64, 64) * 0.2 + 0.8 for _ in range(3)])
    assert sketch_norm_digest(dual, 11) != before
    assert not dual.training
    with torch.no_grad():
        assert torch.equal(plain.embed(x, "photo"), dual.embed(x, "photo"))
        assert (plain.embed(x, "sketch") - dual.embed(x, "sketch")).abs().max() > 1e-3
    # the stem's sketch mean is the plain average of the three batches' means, not a slow running average
    stem = dual.trunk._bn0
    assert isinstance(stem, DomainBatchNorm)
    assert stem.running_mean is not None
    assert not torch.allclose(stem.sketch_mean, stem.running_mean)


def test_each_domain_exports_with_its_own_statistics(tmp_path: Path) -> None:
    import onnxruntime as ort

    _, dual = _pair()
    estimate_sketch_norm(dual, [torch.rand(6, 3, 64, 64) * 0.2 + 0.8])
    x = torch.randn(2, 3, 64, 64)
    outputs = {}
    for domain in ("sketch", "photo"):
        path = export_onnx(dual, domain, 64, 3, tmp_path / f"{domain}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[domain] = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            expected = dual.embed(x, domain).numpy()
        assert np.abs(outputs[domain] - expected).max() < 1e-4
    assert np.abs(outputs["sketch"] - outputs["photo"]).max() > 1e-3


def test_front_only_sketch_statistics_stop_at_the_trainable_blocks() -> None:
    model = build_model(ModelConfig(image_size=64, embed_dim=16, sketch_norm=True, sketch_norm_blocks=11))
    assert isinstance(model, SketchPhotoEncoder)
    dual = {name.split(".")[0] for name, m in model.trunk._blocks.named_modules() if isinstance(m, DomainBatchNorm)}
    assert isinstance(model.trunk._bn0, DomainBatchNorm)
    assert not isinstance(model.trunk._bn1, DomainBatchNorm)
    assert {int(i) for i in dual} == set(range(11))


def test_stage_boundaries_match_the_built_trunks() -> None:
    """Lite1 and Lite2 repeat the middle stages more often, so their taps and first trained block sit at other
    indices than Lite0's: each must fall on the same stage boundary of the trunk that is actually built."""
    from encoder.model import LITE_SCALING, default_first_trained_block, default_mid_blocks, stage_starts

    assert default_mid_blocks("lite0") == (10, 13) and default_first_trained_block("lite0") == 3
    for arch in LITE_SCALING:
        trunk = EfficientNetLite(arch, 192)
        starts = stage_starts(arch)
        channels = trunk.block_channels
        assert len(trunk._blocks) == starts[-1] + 1
        for s in starts[1:]:  # every stage changes the channel count at its first block, nowhere else
            assert channels[s] != channels[s - 1]
        changes = [i for i in range(1, len(channels)) if channels[i] != channels[i - 1]]
        assert changes == starts[1:]
        last_of_5, third_of_6 = default_mid_blocks(arch)
        assert trunk.block_sizes[last_of_5] == 12 and channels[last_of_5] != channels[last_of_5 + 1]
        assert trunk.block_sizes[third_of_6] == 6 and third_of_6 - starts[5] == 2
        first, side = (starts[2], 48) if arch == "lite0" else (starts[3], 24)  # stage 3 / stage 4 on
        assert default_first_trained_block(arch) == first and trunk.block_sizes[first - 1] == side
