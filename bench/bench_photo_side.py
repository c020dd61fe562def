"""Photos at a smaller side than sketches: how much faster, and what it costs in retrieval, distilled or not.

    .venv/bin/python bench/bench_photo_side.py MODEL [--sides 192,160,128] [--distil-epochs 3] [--speed]

MODEL is a checkpoint trained without the held-out categories (as for bench_gallery_neighbours.py). Sketches are
embedded as the model does. Photos go through the same weights at each side ("same weights": only the
convolutions' padding and the taps' pooling windows change) and, with --distil-epochs N, through a copy at that
side trained for N epochs to give each photo the vector the model gives it ("distilled": cosine loss on the photo
and one mirrored random square crop of every photo of the 90 other categories and qmul-shoes/train, blocks from
the first trained one on, the whitening and the pooled join held fixed). Prints acc@1 / acc@10 / mAP@all on the
held-out 10 and qmul-shoes/test, by the embeddings (k = 0) and by gallery vectors (k = 5). --speed prints
photos/s at batch 32 for each side instead (the weights do not change the speed).
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder.checkpoint import Checkpoint, inference_state, load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.embedder import Embedder
from encoder.evaluate import embed_gallery
from encoder.metrics import retrieval_metrics
from encoder.model import POOLED_DIM, SketchPhotoEncoder, default_first_trained_block
from encoder.neighbours import blend_gallery
from encoder.preprocess import load_photo, prepare_photo

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
# the exports of this run, removed when it ends
EXPORTS = tempfile.TemporaryDirectory(prefix="bench-photo-side-")


def at_side(ckpt: Checkpoint, side: int) -> Checkpoint:
    """The same weights taking photos at `side` (used for photos only; its model id is the model's)."""
    return replace(
        ckpt, config=replace(ckpt.config, image_size=side), preprocessing=replace(ckpt.preprocessing, image_size=side)
    )


def embedder(ckpt: Checkpoint) -> Embedder:
    # a fresh export cache each time: copies at other sides share the model's id, and so its cached file name
    return Embedder(ckpt, cache_dir=Path(tempfile.mkdtemp(dir=EXPORTS.name)))


def views(photo: Image.Image, rng: random.Random) -> list[Image.Image]:
    w, h = photo.size
    side = max(1, round(math.sqrt(rng.uniform(0.5, 1.0)) * min(w, h)))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    crop = photo.crop((x0, y0, x0 + side, y0 + side))
    return [photo, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop]


def fit_photo_vectors(
    model: SketchPhotoEncoder, first: int, front: torch.Tensor, target: torch.Tensor, epochs: int, lr: float,
    label: str,
) -> None:
    """Train the model's blocks from `first` on, its head conv and its photo head, in place, so that the block
    inputs `front` give the photo vectors `target` (cosine loss); the rest of the model stays as it is."""
    trunk = model.trunk
    trained = [*trunk._blocks[first:], trunk._conv_head, trunk._bn1, model.photo_head]
    params = [p for m in trained for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    steps = epochs * math.ceil(len(front) / 32)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.eval()  # the BatchNorm statistics, dropout and drop-path stay the model's; only weights move
    for epoch in range(epochs):
        order, total, t0 = torch.randperm(len(front)), 0.0, time.perf_counter()
        for i in range(0, len(front), 32):
            rows = order[i : i + 32]
            feats = model.features_from(front[rows], first, [], "photo")
            out = model.join_pooled(model.finish(model.photo_head(feats)), feats[:, :POOLED_DIM], "photo")
            loss = (1 - (out * target[rows]).sum(dim=1)).mean()
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        print(f"# {label}, epoch {epoch + 1}/{epochs}: 1 - cosine {total / len(front):.4f} "
              f"({time.perf_counter() - t0:.0f} s, {len(front)} views)", flush=True)


def distil(ckpt: Checkpoint, teacher: Embedder, side: int, epochs: int, data_root: Path) -> Checkpoint:
    """A copy of the weights at `side`, trained to reproduce the teacher's photo vectors on the training photos."""
    torch.manual_seed(0)
    small = at_side(ckpt, side)
    model = small.build()
    assert isinstance(model, SketchPhotoEncoder)
    photos = [p.path for p in load_dataset(data_root / "sketchy100").subset(exclude=set(HELD_OUT_CATEGORIES)).photos]
    photos += [p.path for p in load_dataset(data_root / "qmul-shoes" / "train").photos]
    first = default_first_trained_block(ckpt.config.arch)
    rng = random.Random(0)
    fronts, targets, big, little = [], [], [], []
    for i, path in enumerate(photos):
        for view in views(load_photo(path, ckpt.preprocessing), rng):
            big.append(prepare_photo(view, ckpt.preprocessing))
            little.append(prepare_photo(view, small.preprocessing))
        if len(big) >= 64 or i == len(photos) - 1:
            targets.append(teacher.embed_arrays(np.stack(big), "photo"))
            with torch.no_grad():  # the frozen blocks run once per view
                h = model.trunk.stem(torch.from_numpy(np.stack(little)))
                for block in model.trunk._blocks[:first]:
                    h = block(h)
            fronts.append(h)
            big, little = [], []
    front, target = torch.cat(fronts), torch.from_numpy(np.concatenate(targets))
    fit_photo_vectors(model, first, front, target, epochs, 1e-4, f"{side} px")
    return replace(small, state_dict=inference_state(model))


def quality(ckpt: Checkpoint, sides: list[int], epochs: int, data_root: Path) -> None:
    base = embedder(ckpt)
    suites = [
        ("held-out 10", load_dataset(data_root / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))),
        ("qmul-shoes/test", load_dataset(data_root / "qmul-shoes" / "test")),
    ]
    variants: list[tuple[int, str, Embedder]] = []
    for side in sides:
        variants.append((side, "same weights", base if side == ckpt.preprocessing.image_size
                         else embedder(at_side(ckpt, side))))
        if epochs and side < ckpt.preprocessing.image_size:
            variants.append((side, f"distilled {epochs} ep", embedder(distil(ckpt, base, side, epochs, data_root))))
    print(f"# {ckpt.model_id}: sketches at {ckpt.preprocessing.image_size} px")
    print(f"{'suite':<16} {'photos':>5} {'variant':<16} {'k':>2} {'acc@1':>6} {'acc@10':>6} {'mAP@all':>8}")
    for name, data in suites:
        sketches = base.embed_sketches([s.path for s in data.sketches])
        for side, label, emb in variants:
            photos = embed_gallery(emb, data)
            for k in (0, 5):
                m = retrieval_metrics(sketches, blend_gallery(photos, k), data)
                acc = m.instance.acc
                map_all = f"{m.category.map_all:>8.3f}" if m.category else f"{'n/a':>8}"
                print(f"{name:<16} {side:>5} {label:<16} {k:>2} {acc[1]:>6.3f} {acc[10]:>6.3f} {map_all}")


def speed(ckpt: Checkpoint, sides: list[int], data_root: Path, n: int = 512) -> None:
    paths = sorted((data_root / "sketchy100" / "photo").glob("*/*.jpg"))[:n]
    print(f"# {ckpt.model_id}, {len(paths)} photos of sketchy100, batch 32, photos/s")
    print(f"{'side':>5} {'decode alone':>13} {'model only':>11} {'end to end':>11}")
    for side in sides:
        small = at_side(ckpt, side)
        prep, emb = small.preprocessing, embedder(small)
        t0 = time.perf_counter()
        arrays = [prepare_photo(load_photo(p, prep), prep) for p in paths]
        decode = len(paths) / (time.perf_counter() - t0)
        emb.embed_photo_files(paths[:32])  # warm up
        t0 = time.perf_counter()
        emb.embed_photo_files(paths)
        end_to_end = len(paths) / (time.perf_counter() - t0)
        batch = np.stack(arrays[:32])
        t0 = time.perf_counter()
        for _ in range(5):
            emb.embed_arrays(batch, "photo")
        model_only = 5 * len(batch) / (time.perf_counter() - t0)
        print(f"{side:>5} {decode:>13.1f} {model_only:>11.1f} {end_to_end:>11.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--sides", default="192,160,128")
    parser.add_argument("--distil-epochs", type=int, default=0)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    ckpt = load_checkpoint(None if args.model == "default" else args.model)
    sides = [int(s) for s in args.sides.split(",")]
    if args.speed:
        speed(ckpt, sides, args.data)
    else:
        quality(ckpt, sides, args.distil_epochs, args.data)


if __name__ == "__main__":
    main()
