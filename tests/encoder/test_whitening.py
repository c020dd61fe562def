"""Whitening and the pooled join: fitted on constructed vectors with known answers; in a model, exported, reloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from encoder.checkpoint import Checkpoint, inference_state, load_checkpoint, save_checkpoint
from encoder.export import export_onnx, max_onnx_torch_difference
from encoder.model import ModelConfig, SketchPhotoEncoder
from encoder.preprocess import Preprocessing
from encoder.whitening import fit_pooled_join, fit_whitening


def anisotropic(n: int, scales: np.ndarray, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(len(scales), len(scales))))
    return (rng.normal(size=(n, len(scales))) * scales) @ rotation.T + shift


def test_full_whitening_gives_equal_variance_in_every_direction() -> None:
    scales = np.array([10.0, 5.0, 1.0, 0.5, 0.1, 0.05])
    sketches = anisotropic(4000, scales, seed=1, shift=0.3)
    photos = anisotropic(4000, scales, seed=2, shift=-0.3)
    before = np.linalg.eigvalsh(np.cov(np.concatenate([sketches, photos]), rowvar=False))
    mean, matrix = fit_whitening(sketches, photos, power=0.5, shrink=0.0)
    white = (np.concatenate([sketches, photos]) - mean) @ matrix
    after = np.linalg.eigvalsh(np.cov(white, rowvar=False))
    assert before.max() / before.min() > 100
    assert after.max() / after.min() < 1.05
    # the domain means are pooled: the shared mean lies between them
    np.testing.assert_allclose(mean, 0.5 * (sketches.mean(0) + photos.mean(0)), atol=1e-5)


def test_partial_whitening_and_shrink_compress_the_spread_less() -> None:
    scales = np.array([8.0, 4.0, 1.0, 0.25])
    x = anisotropic(3000, scales, seed=3)
    spreads = {}
    for power, shrink in ((0.5, 0.0), (0.25, 0.0), (0.25, 1.0)):
        mean, matrix = fit_whitening(x, x, power, shrink)
        ev = np.linalg.eigvalsh(np.cov((x - mean) @ matrix, rowvar=False))
        spreads[(power, shrink)] = ev.max() / ev.min()
    assert spreads[(0.5, 0.0)] < spreads[(0.25, 0.0)] < spreads[(0.25, 1.0)]
    # power 0 leaves the directions alone: the matrix is a multiple of the identity
    _, identity = fit_whitening(x, x, 0.0, 0.1)
    np.testing.assert_allclose(identity, np.eye(4), atol=1e-5)


def test_bad_whitening_inputs_are_clear_errors() -> None:
    x = anisotropic(10, np.ones(4), seed=4)
    with pytest.raises(ValueError, match="at least two"):
        fit_whitening(x[:1], x, 0.25, 0.1)
    with pytest.raises(ValueError, match="width"):
        fit_whitening(x, x[:, :3], 0.25, 0.1)
    with pytest.raises(ValueError, match="negative"):
        fit_whitening(x, x, -0.5, 0.1)


def small_model() -> SketchPhotoEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="lite0", embed_dim=32, image_size=64, num_classes=3)
    return SketchPhotoEncoder(cfg).eval()


def test_a_whitened_model_embeds_through_its_whitening_and_reloads(tmp_path: Path) -> None:
    model = small_model()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = model.embed(x, "photo")
    rng = np.random.default_rng(5)
    mean = torch.from_numpy(rng.normal(size=32).astype(np.float32)) * 0.05
    matrix = torch.from_numpy(rng.normal(size=(32, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        model.set_whitening(mean[:16], matrix)
    assert not model.cfg.whiten
    model.set_whitening(mean, matrix)
    with torch.no_grad():
        white = model.embed(x, "photo")
    torch.testing.assert_close(white, F.normalize((raw - mean) @ matrix, dim=-1))
    assert torch.allclose(white.norm(dim=1), torch.ones(4))

    ckpt = Checkpoint(
        name="whitened", config=model.cfg, preprocessing=Preprocessing(image_size=64),
        state_dict=inference_state(model),
    )
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "w.pt"))
    assert loaded.config.whiten and loaded.model_id == ckpt.model_id
    with torch.no_grad():
        again = loaded.build().embed(x, "photo")  # type: ignore[operator]
    torch.testing.assert_close(again, white)
    # the whitening is part of the exported graph
    path = export_onnx(loaded.build(), "sketch", 64, 3, tmp_path / "sketch.onnx")
    assert max_onnx_torch_difference(loaded.build(), "sketch", path, x.numpy()) < 1e-4
    # and of the id: the same weights without it are another model, which embeds as before the whitening
    plain = loaded.without_whitening()
    assert plain.model_id != ckpt.model_id and not plain.config.whiten and loaded.config.whiten
    with torch.no_grad():
        torch.testing.assert_close(plain.build().embed(x, "photo"), raw)  # type: ignore[operator]
    assert plain.without_whitening() is plain


def test_the_pooled_join_centres_each_domain_and_keeps_the_top_directions() -> None:
    scales = np.array([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    photos = anisotropic(4000, scales, seed=6, shift=-1.0)
    sketches = photos[::-1] + 3.0  # the same spread around another mean
    photo_mean, sketch_mean, basis = fit_pooled_join(sketches, photos, dims=3)
    np.testing.assert_allclose(photo_mean, photos.mean(0), atol=1e-5)
    np.testing.assert_allclose(sketch_mean, sketches.mean(0), atol=1e-5)
    assert basis is not None and basis.shape == (6, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    # the three kept directions hold (nearly) all the variance of the centred data
    centred = photos - photo_mean
    assert ((centred @ basis) ** 2).sum() / (centred**2).sum() > 0.99
    assert fit_pooled_join(sketches, photos)[2] is None
    with pytest.raises(ValueError, match="at least two"):
        fit_pooled_join(sketches[:1], photos)
    with pytest.raises(ValueError, match="dims"):
        fit_pooled_join(sketches, photos, dims=7)


def test_a_joined_model_outputs_the_weighted_join_and_exports(tmp_path: Path) -> None:
    model = small_model()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = {d: model.embed(x, d) for d in ("photo", "sketch")}
        pooled = {d: model.features(x, d)[:, :1280] for d in ("photo", "sketch")}
    rng = np.random.default_rng(8)
    means = [torch.from_numpy(rng.normal(size=1280).astype(np.float32)) for _ in range(2)]
    basis, _ = torch.linalg.qr(torch.randn(1280, 24))
    with pytest.raises(ValueError, match="1280"):
        model.set_pooled_join(means[0][:10], means[1], basis, 0.5)
    model.set_pooled_join(means[0], means[1], basis, 0.5)
    assert model.cfg.output_dim == 32 + 24
    with torch.no_grad():
        joined = {d: model.embed(x, d) for d in ("photo", "sketch")}
    assert joined["photo"].shape == (4, 56) and torch.allclose(joined["photo"].norm(dim=1), torch.ones(4))
    # the cosine of two joined vectors is the weighted mean of the embedding's and the centred pooled vectors'
    p = {d: F.normalize((pooled[d] - means[i]) @ basis, dim=1) for i, d in enumerate(("photo", "sketch"))}
    expected = (z["sketch"] @ z["photo"].t() + 0.5 * p["sketch"] @ p["photo"].t()) / 1.5
    torch.testing.assert_close(joined["sketch"] @ joined["photo"].t(), expected, atol=1e-5, rtol=1e-4)

    ckpt = Checkpoint(
        name="joined", config=model.cfg, preprocessing=Preprocessing(image_size=64),
        state_dict=inference_state(model),
    )
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "j.pt"))
    assert loaded.dim == 56 and loaded.config.pooled_weight == 0.5
    for domain in ("photo", "sketch"):
        path = export_onnx(loaded.build(), domain, 64, 3, tmp_path / f"{domain}.onnx")
        assert max_onnx_torch_difference(loaded.build(), domain, path, x.numpy()) < 1e-4
    # joined again without a projection: all 1280 values, and no basis left behind in the weights
    rebuilt = loaded.build()
    assert isinstance(rebuilt, SketchPhotoEncoder)
    rebuilt.set_pooled_join(means[0], means[1], None, 0.5)
    assert rebuilt.cfg.output_dim == 32 + 1280 and "pooled_basis" not in rebuilt.state_dict()
