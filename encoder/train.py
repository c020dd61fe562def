"""Training: metric learning of a shared sketch/photo embedding, top to bottom, one config saved in the checkpoint.

The pretrained trunk's early blocks stay frozen; their outputs are computed once per image and augmented view
and cached, so each epoch only runs the trainable blocks and the head. That is what makes training fit a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image, ImageOps
from torch import nn

from encoder.checkpoint import Checkpoint, check_writable, inference_state, save_checkpoint
from encoder.data import SketchyDataset, check_categories, load_dataset
from encoder.errors import DatasetError, SketchSearchError
from encoder.metrics import RetrievalMetrics, retrieval_metrics
from encoder.model import (
    LITE_SCALING,
    POOLED_DIM,
    DomainBatchNorm,
    ModelConfig,
    SketchPhotoEncoder,
    build_model,
    default_first_trained_block,
    default_mid_blocks,
    join_vectors,
    load_imagenet_classifier,
    load_imagenet_weights,
    pool_grid,
)
from encoder.neighbours import blend_gallery
from encoder.preprocess import (
    Preprocessing,
    _normalise,
    crop_sketch,
    load_photo,
    load_sketch,
    open_image,
    resize_photo,
)
from encoder.whitening import fit_pooled_join, fit_whitening

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # seed | lite0 | lite1 | lite2; Lite1 found more exact photos of unseen categories than Lite0 over four seeds
    # of 24 epochs (held-out acc@1 0.23-0.28 against 0.19-0.22, acc@10 0.68-0.72 against 0.64-0.66; docs/BENCHMARKS.md)
    model: str = "lite1"
    # 8: with the joined score, 24 epochs found fewer exact photos of unseen categories (held-out acc@1 0.241 over
    # six seeds against 0.248-0.260 over four 8-epoch runs) for no more mAP (0.604 against 0.606-0.610), buying
    # shoe acc@1 (about 0.41 against 0.37) at three times the cost (docs/BENCHMARKS.md, seventeenth session)
    epochs: int = 8
    batch_size: int = 48  # sketch/photo pairs per step, distinct photos
    lr: float = 3e-4  # head
    trunk_lr: float = 1e-4  # trainable trunk blocks
    weight_decay: float = 1e-4
    margin: float = 0.2
    hard_negatives: str = "hardest"  # hardest | semihard
    ce_weight: float = 1.0  # category cross-entropy beside the triplet loss (0: off)
    ce_scale: float = 16.0
    nce_weight: float = 1.0  # symmetric InfoNCE over the batch beside the triplet loss (0: off)
    nce_temperature: float = 0.07
    kd_weight: float = 0.0  # distillation of the ImageNet classifier's view of each photo into both embeddings
    kd_temperature: float = 2.0  # softens the teacher's 1000-way distribution
    # relational distillation: each batch photo's similarities to the other batch photos follow the ImageNet
    # trunk's. Fine-tuning costs unseen photos their category structure (photo-to-photo mAP 0.83 with ImageNet
    # features, 0.69 after training; docs/BENCHMARKS.md, tenth session), which category ranking of sketches needs.
    # At weight 1 (one seed, 8 epochs) it traded acc@1 for mAP before whitening and changed nothing after it.
    rkd_weight: float = 0.0
    rkd_temperature: float = 0.1  # of both similarity distributions (cosines of centred, normalised features)
    embed_dim: int = 512  # with ce_weight 1.0: +0.015 held-out mAP over 256-d and 0.5 at 16 epochs (3 seeds each)
    image_size: int = 0  # 0: the model's default (DEFAULT_IMAGE_SIZE)
    dropout: float = 0.5
    shared_head: bool = True  # one head for both domains (False: a sketch head and a photo head)
    # blocks before this one are frozen and cached (None: default_first_trained_block: Lite0 3, Lite1/2 7)
    train_from_block: int | None = None
    sketch_norm: bool = False  # separate BatchNorm statistics for sketches, estimated on training sketches
    sketch_norm_front: bool = False  # only in the frozen front: the trainable blocks normalise both domains alike
    sketch_norm_samples: int = 1024  # real training sketches averaged for those statistics
    cache_views: int = 2  # augmented views cached per image (the first is unaugmented)
    # mirror a sketch and its photo together (odd views mirrored, even not; a pair takes views of one parity)
    # rather than each by its own coin flip, which paired mirrored sketches with unmirrored photos: held-out acc@1
    # +0.03 and acc@10 +0.02 for two Lite1 seeds, mAP -0.01 (docs/BENCHMARKS.md, ninth session)
    mirror_pairs: bool = True
    # photos keep the ImageNet trunk (a second, frozen copy) and only sketches run through the fine-tuned one:
    # about half the time per epoch, fewer exact matches and no more mAP after 8 epochs (docs/BENCHMARKS.md)
    frozen_photo_trunk: bool = False
    # the trunk's final pooled vector, centred per domain on the training images, joined to the embedding after
    # training at this weight (0: off; see encoder/whitening.py), projected onto its top principal directions
    # first (0: all 1280): held-out acc@10 +0.03 and mAP +0.05, shoe acc@1 -0.03 to -0.06 (docs/BENCHMARKS.md)
    pooled_weight: float = 0.5
    pooled_dims: int = 256
    # category cross-entropy on the trunk's final pooled vector (a linear classifier, as ImageNet trained it), both
    # domains: the join ranks categories by that vector, so sketches and photos of a category should meet there
    pooled_ce_weight: float = 0.0
    # the triplet and InfoNCE terms on the joined vectors (the trunk's pooled vector centred on running domain means,
    # at pooled_weight) rather than on the embedding alone, so that the head learns what the pooled vector lacks:
    # at 24 epochs held-out mAP +0.010 and acc@10 +0.024 over six seeds each, acc@1 -0.009 (docs/BENCHMARKS.md,
    # fifteenth session). Only where there is a join: with pooled_weight 0 the terms stay on the embedding.
    joined_loss: bool = True
    # whitening fitted on the training embeddings after training (0: off, 0.5: full): at 0.25, shoe acc@1 +0.11 and
    # held-out categories unchanged within a seed's spread (docs/BENCHMARKS.md, sixth session)
    whiten_power: float = 0.25
    whiten_shrink: float = 0.1  # share of the mean eigenvalue added to each eigenvalue before whitening
    select_best: bool = True  # keep the epoch with the best validation score (False: the last epoch)
    threshold: float | None = None  # stored score threshold; None: calibrated on the first validation set
    # the threshold is calibrated (and the final validation measured once more) on gallery vectors, each photo
    # blended with this many nearest photos, because search and eval rank by them by default
    # (SKETCHSEARCH_GALLERY_NEIGHBOURS): blended scores run about 0.04 higher (docs/BENCHMARKS.md); 0: embeddings
    gallery_neighbours: int = 5
    cache_dir: str = ""  # reuse frozen-front outputs across runs (keyed by model, block, views, seed, images)
    pseudo_dirs: list[str] = field(default_factory=list)  # HED pseudo-sketches, <dir>/<category>/<stem>.png
    pseudo_per_epoch: int = 1000  # pseudo-sketch pairs mixed into each epoch
    pseudo_max_ink: float = 0.12  # drop pseudo-sketches of cluttered photos (mostly background lines)
    holdout: list[str] = field(default_factory=list)  # categories kept out of training for validation
    val_dirs: list[str] = field(default_factory=list)  # extra Sketchy-layout folders to validate on
    seed: int = 0
    device: str = "auto"
    name: str = ""


# Lite0 runs at 192 px rather than its native 224: held-out retrieval measured the same (docs/BENCHMARKS.md)
# and a photo costs 27% fewer FLOPs, which is what lets ONNX Runtime embed 150 photos/s on two cores.
# Lite1 and Lite2 too: their native 240 and 260 px would cost 1.6 and 1.8 times the pixels, and Lite2 at 192 px
# already falls below that target in fp32 (142 photos/s end to end, docs/BENCHMARKS.md, seventh session).
DEFAULT_IMAGE_SIZE = {"seed": 96, "lite0": 192, "lite1": 192, "lite2": 192}

# the fewest pairs (of distinct photos) a training batch holds: a smaller remainder is dropped, since the in-batch
# negatives of two or three pairs teach little. So it is also the smallest usable --batch-size (the CLI restates it).
MIN_BATCH = 4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- data: images -> model inputs, with augmentation


def _affine(
    image: Image.Image, rng: random.Random, fill: int | tuple[int, int, int], mirror: bool | None = None
) -> Image.Image:
    """A small random scale/shift/rotation, as drawn by a different hand, and a mirror (None: a coin flip)."""
    size = image.size[0]
    scale = rng.uniform(0.85, 1.1)
    angle = rng.uniform(-8, 8)
    dx, dy = (rng.uniform(-0.06, 0.06) * size for _ in range(2))
    out = image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(round(dx), round(dy)), fillcolor=fill)
    if scale != 1:
        new = max(8, int(size * scale))
        resized = out.resize((new, new), Image.Resampling.BILINEAR)
        canvas = Image.new(out.mode, (size, size), fill)
        canvas.paste(resized, ((size - new) // 2, (size - new) // 2))
        if scale > 1:
            left = (new - size) // 2
            canvas = resized.crop((left, left, left + size, left + size))
        out = canvas
    flip = rng.random() < 0.5 if mirror is None else mirror
    if flip:
        out = ImageOps.mirror(out)
    return out


# an image's model input for a cached view: (augmentation generator or None for the plain view, view index)
ViewLoader = Callable[[random.Random | None, int], np.ndarray]


def view_mirror(view: int, mirror_pairs: bool) -> bool | None:
    """How cached view `view` is mirrored: with mirror_pairs the odd views are and the even ones are not, so that a
    sketch view and a photo view of one parity face the same way; otherwise each view flips a coin (None)."""
    return view % 2 == 1 if mirror_pairs else None


def draw_views(n: int, views: int, mirror_pairs: bool, rng: random.Random) -> tuple[list[int], list[int]]:
    """Cached views for n sketch/photo pairs: any view each, or with mirror_pairs a photo view of the sketch view's
    parity (see view_mirror)."""
    sketch = [rng.randrange(views) for _ in range(n)]
    if mirror_pairs:
        return sketch, [rng.choice(range(v % 2, views, 2)) for v in sketch]
    return sketch, [rng.randrange(views) for _ in range(n)]


def sketch_input(
    path: Path, prep: Preprocessing, rng: random.Random | None, mirror: bool | None = None
) -> np.ndarray:
    square = crop_sketch(load_sketch(path, prep), prep).resize(
        (prep.image_size, prep.image_size), Image.Resampling.LANCZOS
    )
    if rng is not None:
        square = _affine(square, rng, 255, mirror)
    return _normalise(np.asarray(square), prep)


def photo_input(
    path: Path, prep: Preprocessing, rng: random.Random | None, mirror: bool | None = None
) -> np.ndarray:
    photo = resize_photo(load_photo(path, prep), prep.image_size)
    if rng is not None:
        photo = _affine(photo, rng, (127, 127, 127), mirror)
    return _normalise(np.asarray(photo), prep)


def ink_share(path: Path) -> float:
    with open_image(path) as image:  # the pixel limit applies here too: PIL's own is far above it
        return float((np.asarray(image.convert("L")) < 128).mean())


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training: its mean loss (None when the epoch drew no batch), the probe loss, validation."""

    epoch: int
    loss: float | None
    probe_loss: float
    val: dict[str, RetrievalMetrics]


# ---------------------------------------------------------------- the frozen front and the trainable back


class Stages:
    """Splits a model into a frozen front (cached once) and a trainable back."""

    def __init__(self, model: nn.Module, start: int) -> None:
        self.model = model
        self.start = start if isinstance(model, SketchPhotoEncoder) else 0

    @torch.no_grad()
    def front(self, x: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs -> (map entering the trainable blocks, pooled taps of frozen blocks)."""
        m = self.model
        if not isinstance(m, SketchPhotoEncoder):
            return x, torch.zeros(x.shape[0], 0)
        m.trunk.set_domain(domain)
        h = m.trunk.stem(x)
        taps = []
        for i in range(self.start):
            h = m.trunk._blocks[i](h)
            if i in m.cfg.mid_blocks:
                taps.append(pool_grid(h, m.trunk.block_sizes[i], m.cfg.mid_pool))
        tap = torch.cat(taps, 1) if taps else torch.zeros(x.shape[0], 0)
        return h, tap

    def back_features(self, h: torch.Tensor, tap: torch.Tensor, domain: str) -> torch.Tensor:
        """The head's input: pooled features, the final pooled vector first."""
        m = self.model
        assert isinstance(m, SketchPhotoEncoder)
        early = [tap] if tap.shape[1] else []
        m.trunk.set_domain(domain)
        return m.features_from(h, self.start, early, domain)

    def back(self, h: torch.Tensor, tap: torch.Tensor, domain: str) -> torch.Tensor:
        return self.back_pooled(h, tap, domain)[0]

    def back_pooled(self, h: torch.Tensor, tap: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the embedding, the trunk's final pooled vector; empty for the seed model)."""
        m = self.model
        if not isinstance(m, SketchPhotoEncoder):
            return m.embed(h, domain), h.new_zeros(h.shape[0], 0)  # type: ignore[operator]
        feats = self.back_features(h, tap, domain)
        return m.head_for(domain)(feats), feats[:, :POOLED_DIM]

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trunk parameters, head parameters) that the optimiser updates."""
        m = self.model
        if not isinstance(m, SketchPhotoEncoder):
            return [], list(m.parameters())
        trunk = [p for b in m.trunk._blocks[self.start :] for p in b.parameters()]
        trunk += list(m.trunk._conv_head.parameters()) + list(m.trunk._bn1.parameters())
        head = list(m.photo_head.parameters()) + [m.classifier]
        if m.sketch_head is not m.photo_head:
            head += list(m.sketch_head.parameters())
        for p in m.parameters():
            p.requires_grad_(False)
        for p in trunk + head:
            p.requires_grad_(True)
        return trunk, head

    def set_train(self, training: bool) -> None:
        self.model.train(training)
        if isinstance(self.model, SketchPhotoEncoder):
            self.model.trunk._conv_stem.eval()
            self.model.trunk._bn0.eval()
            for block in self.model.trunk._blocks[: self.start]:
                block.eval()
            if self.model.photo_trunk is not None:
                self.model.photo_trunk.eval()  # frozen: its BatchNorm statistics stay ImageNet's


@dataclass
class Cache:
    """Frozen-front outputs of every image and view: maps (N, V, C, H, W) fp16 and taps (N, V, T) fp16."""

    maps: torch.Tensor
    taps: torch.Tensor

    def take(
        self, index: list[int], views: list[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(index)
        v = torch.tensor(views)
        return self.maps[idx, v].to(device).float(), self.taps[idx, v].to(device).float()


def build_cache(
    stages: Stages,
    items: list[tuple[Path, ViewLoader]],
    views: int,
    seed: int,
    device: torch.device,
    desc: str,
    domain: str,
    batch: int = 32,
    store: Path | None = None,
) -> Cache:
    """Run the frozen front on every image and view.

    With `store` (a file per front configuration), results are kept per (image, view) and reused by any later
    run that needs the same image: a held-out run warms the cache of the final one. View 0 is unaugmented; view v
    draws its augmentation from a generator seeded by (seed, image, v), so it is the same whichever run made it.
    """
    from tqdm import tqdm

    known: dict[str, list[torch.Tensor]] = {}
    if store is not None and store.is_file():
        known = torch.load(store, weights_only=True)
    # keyed by resolved path, so that runs naming the same files differently share the cache
    names = [str(Path(path).resolve()) for path, _ in items]
    todo = [(i, v) for i in range(len(items)) for v in range(views) if f"{names[i]}#{v}" not in known]
    with tqdm(total=len(todo), desc=desc, unit="img", leave=False, disable=not todo) as bar:
        for lo in range(0, len(todo), batch):
            chunk = todo[lo : lo + batch]
            arrays = [
                items[i][1](random.Random(f"{seed}:{items[i][0]}:{v}") if v else None, v) for i, v in chunk
            ]
            h, t = stages.front(torch.from_numpy(np.stack(arrays)).to(device), domain)
            for k, (i, v) in enumerate(chunk):
                known[f"{names[i]}#{v}"] = [h[k].half().cpu().clone(), t[k].half().cpu().clone()]
            bar.update(len(chunk))
    if store is not None and todo:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(".tmp")
        torch.save(known, tmp)
        tmp.replace(store)
    maps = torch.stack([torch.stack([known[f"{n}#{v}"][0] for v in range(views)]) for n in names])
    taps = torch.stack([torch.stack([known[f"{n}#{v}"][1] for v in range(views)]) for n in names])
    return Cache(maps, taps)


@torch.no_grad()
def estimate_sketch_norm(model: SketchPhotoEncoder, batches: list[torch.Tensor]) -> None:
    """AdaBN: set each DomainBatchNorm's sketch statistics to their average over batches of sketches."""
    norms = [m for m in model.modules() if isinstance(m, DomainBatchNorm)]
    was_training = model.training
    model.eval()
    model.trunk.set_domain("sketch")
    for k, x in enumerate(batches, 1):
        for bn in norms:
            bn.train()
            bn.sketch_momentum = 1.0 / k  # a running mean with weights 1/k is the plain average
        model.features(x, "sketch")
    for bn in norms:
        bn.sketch_momentum = 0.01
    model.train(was_training)


def sketch_norm_digest(model: SketchPhotoEncoder, start: int) -> str:
    """A short hash of the frozen front's sketch statistics: cached sketch features depend on them."""
    digest = hashlib.sha256()
    front = [model.trunk._bn0, *model.trunk._blocks[:start]]
    for m in (layer for part in front for layer in part.modules()):
        if isinstance(m, DomainBatchNorm):
            digest.update(m.sketch_mean.cpu().numpy().tobytes() + m.sketch_var.cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- losses


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, margin: float, mode: str) -> torch.Tensor:
    """FaceNet triplet loss on L2-normalised embeddings, negatives mined in the batch.

    anchor[i] and positive[i] are a pair; every positive[j], j != i, is a negative for anchor[i].
    """
    d = torch.cdist(anchor, positive).pow(2)  # squared distances, as in FaceNet
    pos = d.diagonal()
    off = torch.eye(len(d), dtype=torch.bool, device=d.device)
    neg = d.masked_fill(off, float("inf"))
    if mode == "semihard":
        # the closest negative that is still farther than the positive; the hardest if there is none
        semi = neg.masked_fill(neg <= pos[:, None], float("inf")).min(dim=1).values
        hardest = neg.min(dim=1).values
        chosen = torch.where(torch.isinf(semi), hardest, semi)
    else:
        chosen = neg.min(dim=1).values
    return F.relu(pos - chosen + margin).mean()


def info_nce_loss(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: each sketch picks its photo among the batch's photos, and each photo its sketch."""
    logits = anchor @ positive.t() / temperature
    labels = torch.arange(len(anchor), device=anchor.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def category_loss(
    emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, scale: float
) -> torch.Tensor:
    logits = scale * emb @ F.normalize(weight, dim=-1).t()
    return F.cross_entropy(logits, labels)


def distillation_loss(
    emb: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of a cosine classifier on the embedding against the teacher's softened distribution."""
    logits = scale * emb @ F.normalize(weight, dim=-1).t()
    return F.cross_entropy(logits, F.softmax(teacher / temperature, dim=-1))


@torch.no_grad()
def _teacher_outputs(
    model: SketchPhotoEncoder,
    start: int,
    cache: Cache,
    device: torch.device,
    project: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 128,
) -> torch.Tensor:
    """project(pooled ImageNet features) of every cached photo view (N, V, D), from the untouched trunk.

    Called before the first training step, while the trainable blocks still hold their ImageNet weights: the
    frozen front's cached outputs plus those blocks are the pretrained network.
    """
    model.eval()
    model.trunk.set_domain("photo")
    n, views = cache.maps.shape[:2]
    out = torch.zeros(0)
    for v in range(views):
        for lo in range(0, n, batch):
            idx = list(range(lo, min(n, lo + batch)))
            h, _ = cache.take(idx, [v] * len(idx), device)
            final, _ = model.trunk.forward_blocks(h, start, ())
            values = project(final.mean(dim=(2, 3)).float())
            if out.numel() == 0:
                out = torch.empty(n, views, values.shape[-1], dtype=torch.float16)
            out[lo : lo + len(idx), v] = values.half().cpu()
    return out


def teacher_logits(model: SketchPhotoEncoder, start: int, cache: Cache, device: torch.device) -> torch.Tensor:
    """ImageNet logits (N, V, 1000) of every cached photo view: the distillation targets of --kd-weight."""
    fc_w, fc_b = (t.to(device) for t in load_imagenet_classifier(model.cfg.arch))
    return _teacher_outputs(model, start, cache, device, lambda pooled: pooled @ fc_w.t() + fc_b)


def teacher_features(model: SketchPhotoEncoder, start: int, cache: Cache, device: torch.device) -> torch.Tensor:
    """Pooled ImageNet features (N, V, 1280) of every cached photo view, centred on their mean and L2-normalised.

    Centring spreads their cosines (the ReLU6 features of any two photos are positively correlated), so that the
    similarity distributions of --rkd-weight tell near from far.
    """
    pooled = _teacher_outputs(model, start, cache, device, lambda p: p).float()
    return F.normalize(pooled - pooled.mean(dim=(0, 1)), dim=-1).half()


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of the student's from the teacher's similarity distribution of each row over the others."""
    n = len(student)
    if n < 3:
        return student.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s = (student @ student.t() / temperature)[off].view(n, n - 1)
    t = (teacher @ teacher.t() / temperature)[off].view(n, n - 1)
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")


# ---------------------------------------------------------------- evaluation on cached or raw inputs


@torch.no_grad()
def embed_cache(
    stages: Stages, cache: Cache, domain: str, device: torch.device, batch: int = 128, pooled: bool = False
) -> np.ndarray:
    """The model's output for view 0 of every cached image (with `pooled`: the trunk's final pooled vector)."""
    out = []
    n = cache.maps.shape[0]
    m = stages.model
    for lo in range(0, n, batch):
        idx = list(range(lo, min(n, lo + batch)))
        h, t = cache.take(idx, [0] * len(idx), device)
        if isinstance(m, SketchPhotoEncoder):
            feats = stages.back_features(h, t, domain)
            if pooled:
                z = feats[:, :POOLED_DIM]
            else:  # whitened and joined once those are fitted
                z = m.join_pooled(m.finish(m.head_for(domain)(feats)), feats[:, :POOLED_DIM], domain)
        else:
            z = stages.back(h, t, domain)
        out.append(z.float().cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- the run


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _discover_sets(paths: list[Path]) -> list[Path]:
    """Sketchy-layout folders under the given paths; folders named 'test' only when named directly.

    Every path must be a folder that yields at least one: a misspelt one beside a good one would otherwise
    train (or fit) on less data than asked, without a word."""
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise DatasetError(f"no such folder: {', '.join(missing)}")
    found: list[Path] = []
    empty: list[str] = []
    for path in paths:
        if (path / "photo").is_dir() or (path / "sketch").is_dir():
            if path not in found:  # named twice, or also found under a folder named before it
                found.append(path)
            continue
        roots = [sub.parent for sub in sorted(path.rglob("photo")) if sub.parent.name != "test"]
        if not roots:  # a path whose sets were all found through another path given is not empty
            empty.append(str(path))
        found += [root for root in roots if root not in found]
    if empty:
        raise DatasetError(
            f"no folder in the Sketchy layout (photo/, sketch/) under {', '.join(empty)} "
            "(folders named test count only when named directly)"
        )
    return found


def _is_checkpoint_file(path: Path) -> bool:
    """Whether `path` holds a readable sketchsearch checkpoint. A damaged one (truncated by a crash) reads as
    someone else's file and is kept: deleting it is a person's decision."""
    try:
        # mmap: only the pickled header is read, not the weights
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything torch cannot read as a checkpoint of tensors is someone else's file
        return False
    return isinstance(payload, dict) and "format" in payload and "state_dict" in payload


def check_checkpoint_output(path: Path) -> None:
    """SketchSearchError unless a checkpoint can be written to `path`: writable, and not an existing file that is
    something else (a checkpoint is replaced, anything else is kept: a mistyped path must not destroy a file)."""
    if path.is_file() and not _is_checkpoint_file(path):
        raise SketchSearchError(
            f"{path} exists and is not a sketchsearch checkpoint: not overwriting it (choose another output path)"
        )
    check_writable(path, "the checkpoint")


def validation_keys(sets: list[SketchyDataset]) -> list[str]:
    """Each validation set's key in the metrics: its folder's name ('test', 'data', as in the shipped checkpoints),
    with its parent folder's name where two sets share one and a number where even that repeats, so that one
    set's results never overwrite another's (and the threshold is calibrated on the first set, as documented)."""
    names = [s.root.name or s.root.resolve().name for s in sets]
    shared = Counter(names)
    keys = [f"{s.root.resolve().parent.name}/{n}" if shared[n] > 1 else n for s, n in zip(sets, names, strict=True)]
    repeats: Counter[str] = Counter(keys)
    seen: Counter[str] = Counter()
    numbered = []
    for key in keys:
        seen[key] += 1
        numbered.append(f"{key}#{seen[key]}" if repeats[key] > 1 else key)
    return numbered


def train(
    data_dirs: list[Path],
    cfg: TrainConfig,
    out: Path,
    progress: bool = True,
    max_pairs: int | None = None,
) -> Checkpoint:
    """Train a model on Sketchy-layout folders; write `out` (a checkpoint) and return it.

    What can be checked before the frozen features are cached is (settings, data, the output): an error found
    only at the end would cost the whole run."""
    from tqdm import tqdm

    if cfg.epochs < 1:
        raise SketchSearchError(f"epochs must be at least 1 (not {cfg.epochs})")
    if cfg.batch_size < MIN_BATCH:
        raise SketchSearchError(
            f"the batch size must be at least {MIN_BATCH} (not {cfg.batch_size}): "
            f"batches of fewer than {MIN_BATCH} pairs are not trained on"
        )
    if cfg.cache_views < 1:  # the first cached view is the unaugmented image: training draws from at least that
        raise SketchSearchError(f"cache_views must be at least 1 (not {cfg.cache_views})")
    out = Path(out)
    check_checkpoint_output(out)
    t_start = time.time()
    seed_everything(cfg.seed)
    device = _device(cfg.device)
    amp = device.type == "cuda"

    if cfg.joined_loss and (cfg.pooled_weight <= 0 or cfg.model == "seed"):  # nothing to join: record that
        cfg = replace(cfg, joined_loss=False)

    # ---- data
    sets = [load_dataset(p) for p in _discover_sets([Path(p) for p in data_dirs])]
    holdout = set(cfg.holdout)
    check_categories(holdout, {c for s in sets for c in s.categories}, "held-out")
    train_sets = [s.subset(exclude=holdout) for s in sets]
    val_sets = [s.subset(categories=holdout) for s in sets if holdout]
    val_sets += [load_dataset(p) for p in cfg.val_dirs]
    val_sets = [v for v in val_sets if v.photos]
    categories = sorted({c for s in train_sets for c in s.categories})
    if not categories:
        where = ", ".join(str(s.root) for s in sets)
        if holdout:
            raise DatasetError(f"no training categories left after the holdout: all of {where} is held out")
        raise DatasetError(f"no photos or sketches to train on in {where}")
    cat_index = {c: i for i, c in enumerate(categories)}

    # ---- model
    if cfg.model == "seed":
        size = cfg.image_size or DEFAULT_IMAGE_SIZE["seed"]
        first_trained = 0  # the seed network trains whole
        mcfg = ModelConfig(arch="seed", embed_dim=128, image_size=size, channels=1, mid_blocks=(), dropout=0.0)
        prep = Preprocessing(image_size=size, channels=1, mean=0.0, std=255.0)
    elif cfg.model in LITE_SCALING:
        size = cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.model]
        first_trained = (
            cfg.train_from_block if cfg.train_from_block is not None else default_first_trained_block(cfg.model)
        )
        mcfg = ModelConfig(
            arch=cfg.model,
            embed_dim=cfg.embed_dim,
            image_size=size,
            dropout=cfg.dropout,
            shared_head=cfg.shared_head,
            num_classes=len(categories),
            sketch_norm=cfg.sketch_norm,
            sketch_norm_blocks=first_trained if cfg.sketch_norm_front else 0,
            mid_blocks=default_mid_blocks(cfg.model),
            frozen_photo_trunk=cfg.frozen_photo_trunk,
        )
        prep = Preprocessing(image_size=size)
    else:
        raise SketchSearchError(f"unknown model {cfg.model!r}: seed, lite0, lite1 or lite2")
    model = build_model(mcfg)
    if isinstance(model, SketchPhotoEncoder):
        load_imagenet_weights(model.trunk, mcfg.arch)
        if model.photo_trunk is not None:
            load_imagenet_weights(model.photo_trunk, mcfg.arch)
    model.to(device)
    stages = Stages(model, first_trained)

    # ---- pairs: real sketches, HED pseudo-sketches of every photo
    photo_paths: list[Path] = []
    photo_cats: list[int] = []
    photo_pos: dict[tuple[int, str, str], int] = {}
    for si, s in enumerate(train_sets):
        for p in s.photos:
            photo_pos[(si, p.category, p.stem)] = len(photo_paths)
            photo_paths.append(p.path)
            photo_cats.append(cat_index[p.category])
    sketch_paths: list[Path] = []
    sketch_photo: list[int] = []  # photo index or -1
    sketch_cats: list[int] = []
    n_real = 0
    for si, s in enumerate(train_sets):
        for sk in s.sketches:
            sketch_paths.append(sk.path)
            sketch_photo.append(photo_pos.get((si, sk.category, sk.photo_stem), -1))
            sketch_cats.append(cat_index[sk.category])
            n_real += 1
    pseudo: list[int] = []
    for pdir in cfg.pseudo_dirs:
        for si, s in enumerate(train_sets):
            for p in s.photos:
                candidate = Path(pdir) / p.category / f"{p.stem}.png"
                if candidate.is_file() and ink_share(candidate) <= cfg.pseudo_max_ink:
                    pseudo.append(len(sketch_paths))
                    sketch_paths.append(candidate)
                    sketch_photo.append(photo_pos[(si, p.category, p.stem)])
                    sketch_cats.append(cat_index[p.category])
    real_pairs = [i for i in range(n_real) if sketch_photo[i] >= 0]
    if max_pairs:
        real_pairs = real_pairs[:max_pairs]
        keep_photos = {sketch_photo[i] for i in real_pairs}
        pseudo = [i for i in pseudo if sketch_photo[i] in keep_photos][:max_pairs]
    logger.info(
        "training on %d categories: %d photos, %d sketches (%d paired), %d pseudo-sketches",
        len(categories),
        len(photo_paths),
        n_real,
        len(real_pairs),
        len(pseudo),
    )
    if not real_pairs and not pseudo:
        raise DatasetError("no sketch/photo pairs to train on: sketches must be named <photo stem>-<n>")
    # an epoch's batches hold pairs of distinct photos, at least MIN_BATCH of them (make_batches): with fewer,
    # every epoch would be empty and an untrained model saved as if trained
    drawn_pseudo = pseudo if cfg.pseudo_per_epoch > 0 else []
    drawn = len(real_pairs) + min(len(pseudo), cfg.pseudo_per_epoch)
    distinct = len({sketch_photo[i] for i in real_pairs + drawn_pseudo})
    if drawn < MIN_BATCH or distinct < MIN_BATCH:
        raise DatasetError(
            f"too few pairs to train on: {len(real_pairs)} sketch/photo pairs"
            + (f" and {len(pseudo)} pseudo-sketch pairs ({min(len(pseudo), cfg.pseudo_per_epoch)} an epoch)"
               if pseudo else "")
            + f" of {distinct} distinct photos; a training batch needs at least {MIN_BATCH} pairs of distinct photos"
        )

    used_sketches = sorted(set(real_pairs) | set(pseudo))
    used_photos = sorted({sketch_photo[i] for i in used_sketches})
    sk_row = {s: r for r, s in enumerate(used_sketches)}
    ph_row = {p: r for r, p in enumerate(used_photos)}

    def sketch_loader(path: Path) -> ViewLoader:
        return lambda rng, view: sketch_input(path, prep, rng, view_mirror(view, cfg.mirror_pairs))

    def photo_loader(path: Path) -> ViewLoader:
        return lambda rng, view: photo_input(path, prep, rng, view_mirror(view, cfg.mirror_pairs))

    def store(kind: str) -> Path | None:
        if not cfg.cache_dir:
            return None
        # only what changes the frozen front's inputs or outputs belongs in the key
        front_prep = {k: v for k, v in prep.to_dict().items() if k not in ("sketch_flip", "max_pixels")}
        parts: list[Any] = [cfg.model, stages.start, front_prep, cfg.seed]
        if cfg.mirror_pairs:
            parts.append("mirror-pairs")  # the views themselves differ
        if kind == "sketch" and mcfg.sketch_norm:
            parts.append(sketch_norm_digest(model, stages.start))  # type: ignore[arg-type]
        key = json.dumps(parts)
        return Path(cfg.cache_dir) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    stages.set_train(False)
    t0 = time.time()
    if isinstance(model, SketchPhotoEncoder) and mcfg.sketch_norm:
        # human sketches only: they, not the HED pseudo-sketches, are what the model meets at search time
        pool = list(range(n_real)) or pseudo
        sample = random.Random(cfg.seed).sample(pool, min(cfg.sketch_norm_samples, len(pool)))
        arrays = [sketch_input(sketch_paths[i], prep, None) for i in sample]
        estimate_sketch_norm(
            model, [torch.from_numpy(np.stack(arrays[lo : lo + 64])).to(device) for lo in range(0, len(arrays), 64)]
        )
        logger.info("estimated sketch BatchNorm statistics on %d sketches", len(sample))
    sk_items = [(sketch_paths[i], sketch_loader(sketch_paths[i])) for i in used_sketches]
    ph_items = [(photo_paths[i], photo_loader(photo_paths[i])) for i in used_photos]
    sk_cache = build_cache(
        stages, sk_items, cfg.cache_views, cfg.seed, device, "cache sketches", "sketch", store=store("sketch")
    )
    ph_cache = build_cache(
        stages, ph_items, cfg.cache_views, cfg.seed, device, "cache photos", "photo", store=store("photo")
    )
    val_caches = []
    for v in val_sets:
        vs_items = [(s.path, sketch_loader(s.path)) for s in v.sketches]
        vp_items = [(p.path, photo_loader(p.path)) for p in v.photos]
        val_caches.append(
            (
                v,
                build_cache(
                    stages, vs_items, 1, cfg.seed, device, "cache val sketches", "sketch", store=store("sketch")
                ),
                build_cache(
                    stages, vp_items, 1, cfg.seed, device, "cache val photos", "photo", store=store("photo")
                ),
            )
        )
    cache_seconds = time.time() - t0
    logger.info("cached frozen features in %.0f s", cache_seconds)

    # ---- the distillation teacher: ImageNet logits of every photo view, taken before training changes a weight
    kd_on = cfg.kd_weight > 0 and isinstance(model, SketchPhotoEncoder)
    kd_targets = torch.zeros(0)
    kd_classifier = nn.Parameter(torch.zeros(0))
    kd_scale = nn.Parameter(torch.zeros(0))
    if kd_on:
        t_kd = time.time()
        kd_targets = teacher_logits(model, stages.start, ph_cache, device)  # type: ignore[arg-type]
        kd_classifier = nn.Parameter(torch.randn(kd_targets.shape[-1], mcfg.embed_dim, device=device) * 0.01)
        kd_scale = nn.Parameter(torch.tensor(16.0, device=device))
        logger.info("teacher logits of %d photo views in %.0f s", kd_targets.shape[0] * kd_targets.shape[1],
                    time.time() - t_kd)

    # ---- the relational teacher: centred ImageNet features of every photo view, likewise taken before training
    rkd_on = cfg.rkd_weight > 0 and isinstance(model, SketchPhotoEncoder)
    rkd_targets = torch.zeros(0)
    if rkd_on:
        t_rkd = time.time()
        rkd_targets = teacher_features(model, stages.start, ph_cache, device)  # type: ignore[arg-type]
        logger.info("teacher features of %d photo views in %.0f s", rkd_targets.shape[0] * rkd_targets.shape[1],
                    time.time() - t_rkd)

    # ---- optimiser
    trunk_params, head_params = stages.trainable()
    if kd_on:
        head_params = head_params + [kd_classifier, kd_scale]
    # a training-only linear classifier on the pooled vector: not part of the model, so not in the checkpoint
    pooled_ce_on = cfg.pooled_ce_weight > 0 and isinstance(model, SketchPhotoEncoder)
    # (made only when on: its random initialisation would shift every later draw of a run without it)
    pooled_classifier = nn.Linear(POOLED_DIM, max(len(categories), 1)).to(device) if pooled_ce_on else None
    if pooled_classifier is not None:
        head_params = head_params + list(pooled_classifier.parameters())
    joined_on = cfg.joined_loss and isinstance(model, SketchPhotoEncoder)  # pooled_weight > 0: see above
    # each domain's mean pooled vector (photo, sketch), followed over training as the join's means are fitted after
    pooled_centre: torch.Tensor | None = None

    @torch.no_grad()
    def update_pooled_centre(sketches: torch.Tensor, photos: torch.Tensor) -> None:
        nonlocal pooled_centre
        means = torch.stack([photos.mean(dim=0), sketches.mean(dim=0)])
        pooled_centre = means if pooled_centre is None else 0.9 * pooled_centre + 0.1 * means

    def join_pooled_batch(z: torch.Tensor, pooled: torch.Tensor, row: int) -> torch.Tensor:
        """The model's join on all 1280 directions, centred on the running means rather than fitted ones."""
        assert pooled_centre is not None
        return join_vectors(z, pooled - pooled_centre[row], cfg.pooled_weight)
    groups: list[dict[str, Any]] = [{"params": head_params, "lr": cfg.lr}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr": cfg.trunk_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(
        1, math.ceil((len(real_pairs) + min(len(pseudo), cfg.pseudo_per_epoch)) / cfg.batch_size)
    )
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[float(g["lr"]) for g in groups], total_steps=max(total, 2), pct_start=0.15
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rng = random.Random(cfg.seed)

    def make_batches() -> list[list[int]]:
        chosen = real_pairs + rng.sample(pseudo, min(len(pseudo), cfg.pseudo_per_epoch))
        rng.shuffle(chosen)
        batches: list[list[int]] = []
        while chosen:
            current: list[int] = []
            photos_in: set[int] = set()
            deferred: list[int] = []
            for i in chosen:
                # distinct photos in a batch, so that every other photo is a true negative
                if len(current) < cfg.batch_size and sketch_photo[i] not in photos_in:
                    current.append(i)
                    photos_in.add(sketch_photo[i])
                else:
                    deferred.append(i)
            if len(current) < MIN_BATCH:
                break
            batches.append(current)
            chosen = deferred
        return batches

    val_keys = validation_keys([v for v, _, _ in val_caches])

    def validate(neighbours: int = 0) -> dict[str, RetrievalMetrics]:
        stages.set_train(False)
        results = {}
        for key, (v, vs, vp) in zip(val_keys, val_caches, strict=True):
            results[key] = retrieval_metrics(
                embed_cache(stages, vs, "sketch", device),
                blend_gallery(embed_cache(stages, vp, "photo", device), neighbours),
                v,
            )
        return results

    def score(results: dict[str, RetrievalMetrics]) -> float:
        if not results:
            return 0.0
        return float(
            np.mean([r.instance.acc[1] + r.instance.acc[10] + (r.category.map_all if r.category else 0.0)
                     for r in results.values()])
        )

    probe_batches = make_batches()[:8]  # a fixed sample of training batches to track the loss on
    rng = random.Random(cfg.seed)  # drawing the probe consumed the generator: start the epochs afresh

    @torch.no_grad()
    def probe_loss() -> float:
        """The triplet loss on fixed training batches, unaugmented, in eval mode: comparable across epochs."""
        stages.set_train(False)
        values = []
        for batch in probe_batches:
            hs, ts = sk_cache.take([sk_row[i] for i in batch], [0] * len(batch), device)
            hp, tp = ph_cache.take([ph_row[sketch_photo[i]] for i in batch], [0] * len(batch), device)
            es, ep = stages.back(hs, ts, "sketch").float(), stages.back(hp, tp, "photo").float()
            values.append(float(triplet_loss(es, ep, cfg.margin, "hardest")))
        return float(np.mean(values)) if values else 0.0

    initial_loss = probe_loss()
    best_state: dict[str, torch.Tensor] | None = None
    best_score, best_epoch = -1.0, 0
    history: list[EpochRecord] = []
    # the seed model reproduces the study: FaceNet triplet loss only
    ce_on = cfg.ce_weight > 0 and isinstance(model, SketchPhotoEncoder)
    nce_on = cfg.nce_weight > 0 and isinstance(model, SketchPhotoEncoder)
    # trainable blocks with sketch statistics need batches of one domain at a time
    per_domain_back = (mcfg.sketch_norm and not cfg.sketch_norm_front) or mcfg.frozen_photo_trunk
    for epoch in range(1, cfg.epochs + 1):
        stages.set_train(True)
        batches = make_batches()
        if not batches:  # the check above rules this out unless a small pseudo-sketch draw repeats photos
            if epoch == 1:  # nothing trained yet: say so now rather than save an untrained model
                raise DatasetError(
                    f"epoch 1 drew no batch of {MIN_BATCH} pairs of distinct photos: add pairs or raise "
                    "pseudo_per_epoch"
                )
            # a later unlucky draw must not throw away the epochs already trained
            logger.warning("epoch %d drew no batch of %d pairs of distinct photos: skipped", epoch, MIN_BATCH)
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            sk_idx = [sk_row[i] for i in batch]
            ph_idx = [ph_row[sketch_photo[i]] for i in batch]
            sk_views, ph_views = draw_views(len(batch), cfg.cache_views, cfg.mirror_pairs, rng)
            hs, ts = sk_cache.take(sk_idx, sk_views, device)
            hp, tp = ph_cache.take(ph_idx, ph_views, device)
            with torch.autocast(device.type, enabled=amp):
                # the pooled vectors (sketches first) come free with the embeddings: a slice of the head's input
                if mcfg.shared_head and not per_domain_back:
                    emb, pooled = stages.back_pooled(torch.cat([hs, hp]), torch.cat([ts, tp]), "photo")
                    es, ep = emb[: len(batch)], emb[len(batch) :]
                else:
                    (es, pooled_s), (ep, pooled_p) = (
                        stages.back_pooled(hs, ts, "sketch"), stages.back_pooled(hp, tp, "photo")
                    )
                    pooled = torch.cat([pooled_s, pooled_p])
                es, ep = es.float(), ep.float()
                # the instance terms rank by what eval ranks by: with --joined-loss, the joined vectors
                js, jp = es, ep
                if joined_on:
                    ps, pp = pooled[: len(batch)].float(), pooled[len(batch) :].float()
                    update_pooled_centre(ps.detach(), pp.detach())
                    js, jp = join_pooled_batch(es, ps, 1), join_pooled_batch(ep, pp, 0)
                loss = triplet_loss(js, jp, cfg.margin, cfg.hard_negatives)
                if nce_on:
                    loss = loss + cfg.nce_weight * info_nce_loss(js, jp, cfg.nce_temperature)
                if kd_on:
                    target = kd_targets[torch.tensor(ph_idx), torch.tensor(ph_views)].to(device).float()
                    loss = loss + cfg.kd_weight * 0.5 * (
                        distillation_loss(es, kd_classifier, kd_scale, target, cfg.kd_temperature)
                        + distillation_loss(ep, kd_classifier, kd_scale, target, cfg.kd_temperature)
                    )
                if rkd_on:
                    target = rkd_targets[torch.tensor(ph_idx), torch.tensor(ph_views)].to(device).float()
                    loss = loss + cfg.rkd_weight * relation_loss(ep, target, cfg.rkd_temperature)
                labels = torch.tensor([sketch_cats[i] for i in batch], device=device)
                if ce_on:
                    weight: torch.Tensor = model.classifier  # type: ignore[assignment]
                    loss = loss + cfg.ce_weight * 0.5 * (
                        category_loss(es, labels, weight, cfg.ce_scale)
                        + category_loss(ep, labels, weight, cfg.ce_scale)
                    )
                if pooled_classifier is not None:
                    logits = pooled_classifier(pooled.float())
                    loss = loss + cfg.pooled_ce_weight * F.cross_entropy(logits, torch.cat([labels, labels]))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        results = validate()
        epoch_score = score(results)
        # loss None: a skipped epoch, not a perfect one
        history.append(EpochRecord(epoch, float(np.mean(losses)) if losses else None, probe_loss(), results))
        loss_text = f"{history[-1].loss:.4f}" if losses else "- (skipped)"
        logger.info("epoch %d loss %s val %s", epoch, loss_text, _summary(results))
        if not val_caches or not cfg.select_best or epoch_score > best_score:
            best_score, best_epoch = epoch_score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    assert best_state is not None
    model.load_state_dict(best_state)
    final_val = history[best_epoch - 1].val if history else {}
    raw_val: dict[str, RetrievalMetrics] = {}
    if cfg.whiten_power > 0 and isinstance(model, SketchPhotoEncoder):
        # fitted on the unaugmented views of the human sketches and the photos trained on
        stages.set_train(False)
        real_rows = [sk_row[i] for i in used_sketches if i < n_real]
        sk_all = embed_cache(stages, sk_cache, "sketch", device)
        ph_all = embed_cache(stages, ph_cache, "photo", device)
        mean, matrix = fit_whitening(
            sk_all[real_rows] if real_rows else sk_all, ph_all, cfg.whiten_power, cfg.whiten_shrink
        )
        model.set_whitening(torch.from_numpy(mean), torch.from_numpy(matrix))
        raw_val, final_val = final_val, validate()
        logger.info("whitened (power %.2f): val %s", cfg.whiten_power, _summary(final_val))
    unjoined_val: dict[str, RetrievalMetrics] = {}
    if cfg.pooled_weight > 0 and isinstance(model, SketchPhotoEncoder):
        stages.set_train(False)
        real_rows = [sk_row[i] for i in used_sketches if i < n_real]
        sk_pool = embed_cache(stages, sk_cache, "sketch", device, pooled=True)
        ph_pool = embed_cache(stages, ph_cache, "photo", device, pooled=True)
        photo_mean, sketch_mean, basis = fit_pooled_join(
            sk_pool[real_rows] if real_rows else sk_pool, ph_pool, cfg.pooled_dims
        )
        model.set_pooled_join(
            torch.from_numpy(photo_mean), torch.from_numpy(sketch_mean),
            None if basis is None else torch.from_numpy(basis), cfg.pooled_weight,
        )
        unjoined_val, final_val = final_val, validate()
        logger.info("pooled vector joined (weight %.2f): val %s", cfg.pooled_weight, _summary(final_val))
    gallery_val = validate(cfg.gallery_neighbours) if cfg.gallery_neighbours > 0 else {}
    model.to("cpu").eval()
    threshold = cfg.threshold
    if threshold is None:
        threshold = _calibrated_threshold(gallery_val or final_val)
    ckpt = Checkpoint(
        name=cfg.name or f"sketchsearch-{cfg.model}",
        config=mcfg,
        preprocessing=prep,
        state_dict=inference_state(model),
        metrics={
            "validation": _stored(final_val),
            **({"validation_unwhitened": _stored(raw_val)} if raw_val else {}),
            **({"validation_unjoined": _stored(unjoined_val)} if unjoined_val else {}),
            **({"validation_gallery": _stored(gallery_val)} if gallery_val else {}),
            "threshold_neighbours": cfg.gallery_neighbours,
            "best_epoch": best_epoch,
            "initial_probe_loss": initial_loss,
            "history": [
                {"epoch": h.epoch, "loss": h.loss, "probe_loss": h.probe_loss, "val": _summary(h.val)}
                for h in history
            ],
            "train_seconds": time.time() - t_start,
            "cache_seconds": cache_seconds,
            "pairs": {"real": len(real_pairs), "pseudo": len(pseudo)},
        },
        threshold=threshold,
        train_config={**asdict(cfg), "data_dirs": [str(p) for p in data_dirs]},
        categories=categories,
    )
    save_checkpoint(ckpt, out, half=False)
    logger.info(
        "saved %s (%s) after %.0f s, best epoch %d", out, ckpt.model_id, time.time() - t_start, best_epoch
    )
    return ckpt


def _summary(results: dict[str, RetrievalMetrics]) -> str:
    return "; ".join(
        f"{name}: acc@1 {r.instance.acc[1]:.3f} acc@10 {r.instance.acc[10]:.3f} mAP {r.map_all:.3f}"
        for name, r in results.items()
    )


def _stored(results: dict[str, RetrievalMetrics]) -> dict[str, Any]:
    """Validation results as a checkpoint stores them: plain JSON values, which load with weights_only=True."""
    return {name: r.to_json() for name, r in results.items()}


def _calibrated_threshold(validation: dict[str, RetrievalMetrics]) -> float | None:
    """The threshold calibrated on the first validation set (None when there is none)."""
    for r in validation.values():
        return r.threshold.value
    return None


def _validation_sets(
    sets: list[SketchyDataset], exclude: set[str], val_dirs: list[Path] | None, threshold: float | None
) -> list[SketchyDataset]:
    """The held-out categories of the data, then the extra folders; one of them must calibrate the threshold."""
    check_categories(exclude, {c for s in sets for c in s.categories}, "held-out")
    val_sets = [s.subset(categories=exclude) for s in sets if exclude] + [load_dataset(p) for p in val_dirs or []]
    val_sets = [v for v in val_sets if v.photos]
    if threshold is None and not val_sets:
        # whitening and the join change the scores' scale, so the old model's threshold would be wrong
        if exclude:
            raise SketchSearchError(
                f"no threshold for the new model: the held-out categories ({', '.join(sorted(exclude))}) have no "
                "photos to calibrate one on: give validation data (--val) or a threshold (--threshold)"
            )
        raise SketchSearchError(
            "no threshold for the new model: give held-out categories or validation data to calibrate one "
            "(--holdout, --val), or a threshold (--threshold)"
        )
    return val_sets


def _validate_checkpoint(
    ckpt: Checkpoint, val_sets: list[SketchyDataset], neighbours: int = 0
) -> tuple[dict[str, RetrievalMetrics], dict[str, RetrievalMetrics]]:
    """Validated like train(): the held-out categories of the data first, then the extra folders; by the photo
    embeddings, then (empty when neighbours is 0) by gallery vectors blended with `neighbours` nearest photos."""
    from encoder.embedder import Embedder
    from encoder.evaluate import embed_gallery

    embedder = Embedder(ckpt)
    plain, blended = {}, {}
    for key, v in zip(validation_keys(val_sets), val_sets, strict=True):
        sketches, photos = embedder.embed_sketches([s.path for s in v.sketches]), embed_gallery(embedder, v)
        plain[key] = retrieval_metrics(sketches, photos, v)
        if neighbours > 0:
            blended[key] = retrieval_metrics(sketches, blend_gallery(photos, neighbours), v)
    return plain, blended


def whiten_checkpoint(
    ckpt: Checkpoint,
    data_dirs: list[Path],
    power: float,
    shrink: float,
    holdout: list[str] | None = None,
    val_dirs: list[Path] | None = None,
    threshold: float | None = None,
    neighbours: int = 5,
) -> Checkpoint:
    """Fit whitening for an already trained checkpoint on its training data, as `train` does after its last epoch.

    The sketches are the human ones with their photo in the data, the photos all photos of the data (minus the
    `holdout` categories). The held-out categories, then `val_dirs`, are evaluated afterwards; the first of them
    calibrates the threshold (on gallery vectors of `neighbours` nearest photos, as `train` does) unless one is
    given. Returns a new checkpoint (a new model id); the input is left as it is.
    """
    from encoder.embedder import Embedder

    if ckpt.config.arch not in LITE_SCALING or ckpt.config.embed_dim == 0:
        raise SketchSearchError(f"{ckpt.model_id}: only trained EfficientNet-Lite models can be whitened")
    if ckpt.config.pooled_weight > 0:
        raise SketchSearchError(f"{ckpt.model_id} joins the pooled vector: whiten the model before the join")
    if ckpt.config.whiten:
        raise SketchSearchError(f"{ckpt.model_id} is already whitened: start from the checkpoint before it")
    if power <= 0:
        raise SketchSearchError("the whitening power must be above 0 (0.5: full whitening)")
    exclude = set(holdout or [])
    sets = [load_dataset(root) for root in _discover_sets(data_dirs)]
    val_sets = _validation_sets(sets, exclude, val_dirs, threshold)
    embedder = Embedder(ckpt)
    sketches, photos = [], []
    for data in (s.subset(exclude=exclude) for s in sets):
        paired = sorted({s for s, _ in data.instance_pairs()})
        sketches.append(embedder.embed_sketches([data.sketches[i].path for i in paired]))
        embedded = embedder.embed_photo_files([p.path for p in data.photos])
        if embedded.failures:  # the fit only needs the photos' spread, so a bad file is left out, not fatal
            logger.warning("%s: %d photos could not be read and are left out of the fit", data.root,
                           len(embedded.failures))
        photos.append(embedded.vectors)
    mean, matrix = fit_whitening(np.concatenate(sketches), np.concatenate(photos), power, shrink)
    model = ckpt.build()
    assert isinstance(model, SketchPhotoEncoder)
    model.set_whitening(torch.from_numpy(mean), torch.from_numpy(matrix))
    return _refitted(
        ckpt, model, {"whiten_power": power, "whiten_shrink": shrink}, val_sets, threshold, neighbours,
        "validation_unwhitened", "whitening",
        {"power": power, "shrink": shrink, **_fit_record(data_dirs, exclude, sketches, photos)},
    )


def _fit_record(
    data_dirs: list[Path], exclude: set[str], sketches: list[np.ndarray], photos: list[np.ndarray]
) -> dict[str, Any]:
    return {
        "fitted_on": [str(p) for p in data_dirs],
        "holdout": sorted(exclude),
        "sketches": int(sum(len(s) for s in sketches)),
        "photos": int(sum(len(p) for p in photos)),
    }


def _refitted(
    ckpt: Checkpoint,
    model: SketchPhotoEncoder,
    settings: dict[str, Any],
    val_sets: list[SketchyDataset],
    threshold: float | None,
    neighbours: int,
    before_key: str,
    record_key: str,
    record: dict[str, Any],
) -> Checkpoint:
    """The checkpoint of `model` after a fit on the training data (whitening, the join): validated, its threshold
    calibrated on the first validation set (on gallery vectors when `neighbours` > 0) unless one is given. The old
    validation would read as this model's, so it moves aside under `before_key`."""
    refitted = replace(
        ckpt, config=model.cfg, state_dict=inference_state(model),
        train_config={**ckpt.train_config, **settings, "gallery_neighbours": neighbours},
    )
    validation, gallery_validation = _validate_checkpoint(refitted, val_sets, neighbours)
    return replace(
        refitted,
        threshold=threshold if threshold is not None else _calibrated_threshold(gallery_validation or validation),
        metrics={
            **{k: v for k, v in ckpt.metrics.items() if k not in ("validation", "validation_gallery")},
            before_key: ckpt.metrics.get("validation", {}),
            **({"validation": _stored(validation)} if validation else {}),
            **({"validation_gallery": _stored(gallery_validation)} if gallery_validation else {}),
            "threshold_neighbours": neighbours,
            record_key: record,
        },
    )


@torch.no_grad()
def pooled_vectors(
    model: SketchPhotoEncoder, prep: Preprocessing, paths: list[Path], domain: str, batch: int = 32
) -> np.ndarray:
    """The trunk's final pooled vector of each readable image (an unreadable one is left out, with a warning)."""
    load = photo_input if domain == "photo" else sketch_input
    model.eval()
    model.trunk.set_domain(domain)
    out = [np.zeros((0, POOLED_DIM), dtype=np.float32)]
    failed = 0
    for lo in range(0, len(paths), batch):
        arrays = []
        for path in paths[lo : lo + batch]:
            try:
                arrays.append(load(path, prep, None))
            except SketchSearchError as exc:
                failed += 1
                logger.warning("%s left out of the fit: %s", path, exc)
        if arrays:
            out.append(model.features(torch.from_numpy(np.stack(arrays)), domain)[:, :POOLED_DIM].float().numpy())
    if failed:
        logger.warning("%d of %d %ss could not be read", failed, len(paths), domain)
    return np.concatenate(out)


def join_pooled_checkpoint(
    ckpt: Checkpoint,
    data_dirs: list[Path],
    weight: float,
    dims: int = 0,
    holdout: list[str] | None = None,
    val_dirs: list[Path] | None = None,
    threshold: float | None = None,
    neighbours: int = 5,
) -> Checkpoint:
    """Join the trunk's centred pooled vector to an already trained checkpoint's embedding, as `train` does with
    --pooled-weight: the means (and basis) are fitted on the training data like the whitening (human sketches
    with their photo, every photo), then the held-out categories and `val_dirs` are evaluated and the first
    calibrates the threshold (on gallery vectors of `neighbours` nearest photos) unless one is given. Returns a new
    checkpoint (a new id, wider vectors)."""
    if ckpt.config.arch not in LITE_SCALING or ckpt.config.embed_dim == 0:
        raise SketchSearchError(f"{ckpt.model_id}: only trained EfficientNet-Lite models can join the pooled vector")
    if ckpt.config.pooled_weight > 0:
        raise SketchSearchError(f"{ckpt.model_id} already joins the pooled vector: start from the model before it")
    if weight <= 0:
        raise SketchSearchError("the pooled vector's weight must be above 0")
    exclude = set(holdout or [])
    sets = [load_dataset(root) for root in _discover_sets(data_dirs)]
    val_sets = _validation_sets(sets, exclude, val_dirs, threshold)
    model = ckpt.build()
    assert isinstance(model, SketchPhotoEncoder)
    sketches, photos = [], []
    for data in (s.subset(exclude=exclude) for s in sets):
        paired = sorted({s for s, _ in data.instance_pairs()})
        sketches.append(pooled_vectors(model, ckpt.preprocessing, [data.sketches[i].path for i in paired], "sketch"))
        photos.append(pooled_vectors(model, ckpt.preprocessing, [p.path for p in data.photos], "photo"))
    try:
        photo_mean, sketch_mean, basis = fit_pooled_join(np.concatenate(sketches), np.concatenate(photos), dims)
    except ValueError as exc:
        raise SketchSearchError(f"cannot fit the pooled join: {exc}") from exc
    model.set_pooled_join(
        torch.from_numpy(photo_mean), torch.from_numpy(sketch_mean),
        None if basis is None else torch.from_numpy(basis), weight,
    )
    return _refitted(
        ckpt, model, {"pooled_weight": weight, "pooled_dims": dims}, val_sets, threshold, neighbours,
        "validation_unjoined", "pooled_join",
        {"weight": weight, "dims": dims, **_fit_record(data_dirs, exclude, sketches, photos)},
    )
