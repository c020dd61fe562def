"""A shallower photo branch: the model's trunk with one block dropped from each middle stage, distilled or not.

    .venv/bin/python bench/bench_photo_depth.py MODEL [--distil-epochs 3] [--views 2] [--drop 3,6,10,13,18] [--speed]

Photos are the bulk path and sketches come one at a time, so only the photo branch has to be cheap. EfficientNet-
Lite1 repeats its five middle stages once more than Lite0 does (21 blocks against 16, at the same widths); the
repeated blocks are residual and the model was trained with drop-path, so the same weights without one block per
stage are a network of Lite0's cost that starts close to the model. Which block of each stage goes is picked by
the photo vectors it changes least (mean cosine to the model's on 128 training photos). With --distil-epochs N the
blocks from the first fine-tuned one on (and the photo head) are trained for N epochs to give each photo view the
vector the full model gives it (cosine loss; the whitening and the pooled join held fixed, so sketch scores keep
their meaning). Training photos: the 90 other categories and qmul-shoes/train, each as --views views (itself,
mirrored, then random square crops, mirrored at random).

MODEL is a checkpoint trained without the held-out categories. Prints acc@1 / acc@10 / mAP@all on the held-out 10
and qmul-shoes/test, by the embeddings (k = 0) and by gallery vectors (k = 5), sketches always through the full
model. --speed prints photos/s at batch 32 instead, full and shallow graph alternating (the weights do not change
the speed).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_photo_side import fit_photo_vectors  # a sibling script: bench/ is on the path when run
from PIL import Image
from torch import nn

from encoder.checkpoint import Checkpoint, load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.embedder import Embedder
from encoder.evaluate import embed_gallery
from encoder.export import export_onnx
from encoder.metrics import retrieval_metrics
from encoder.model import SketchPhotoEncoder, default_first_trained_block, stage_starts
from encoder.neighbours import blend_gallery
from encoder.preprocess import load_photo, prepare_photo

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
EXPORTS = tempfile.TemporaryDirectory(prefix="bench-photo-depth-")


def shallow(model: SketchPhotoEncoder, dropped: set[int]) -> SketchPhotoEncoder:
    """A copy of the model without the given trunk blocks; a tap on a dropped block moves to the block before."""
    student = copy.deepcopy(model)
    trunk = student.trunk
    kept = [i for i in range(len(trunk._blocks)) if i not in dropped]
    trunk._blocks = nn.ModuleList(trunk._blocks[i] for i in kept)
    trunk.block_channels = [trunk.block_channels[i] for i in kept]
    trunk.block_sizes = [trunk.block_sizes[i] for i in kept]
    student.cfg = replace(
        student.cfg, mid_blocks=tuple(max(j for j, i in enumerate(kept) if i <= tap) for tap in model.cfg.mid_blocks)
    )
    return student.eval()


def torch_photos(model: SketchPhotoEncoder, arrays: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model.embed(torch.from_numpy(arrays[i : i + 32]), "photo")
                          for i in range(0, len(arrays), 32)]).numpy()


def pick_dropped(model: SketchPhotoEncoder, arrays: np.ndarray) -> set[int]:
    """One residual block from each middle stage (2-6): the one whose removal changes the photo vectors least."""
    full = torch_photos(model, arrays)
    starts = stage_starts(model.cfg.arch) + [len(model.trunk._blocks)]
    dropped = set()
    for stage in range(1, 6):
        scores = {}
        for i in range(starts[stage] + 1, starts[stage + 1]):  # the first block of a stage changes its shape
            scores[i] = float((torch_photos(shallow(model, {i}), arrays) * full).sum(1).mean())
        best = max(scores, key=lambda i: scores[i])
        print(f"# stage {stage + 1}: mean cosine without block " +
              ", ".join(f"{i}: {s:.4f}" for i, s in scores.items()) + f" -> drop {best}", flush=True)
        dropped.add(best)
    both = float((torch_photos(shallow(model, dropped), arrays) * full).sum(1).mean())
    print(f"# without blocks {sorted(dropped)}: mean cosine {both:.4f}", flush=True)
    return dropped


def views(photo: Image.Image, n: int, rng: random.Random) -> list[Image.Image]:
    out = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)][:n]
    w, h = photo.size
    while len(out) < n:
        side = max(1, round(math.sqrt(rng.uniform(0.5, 1.0)) * min(w, h)))
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = photo.crop((x0, y0, x0 + side, y0 + side))
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def training_photos(data_root: Path) -> list[Path]:
    sketchy = load_dataset(data_root / "sketchy100").subset(exclude=set(HELD_OUT_CATEGORIES))
    return [p.path for p in sketchy.photos] + [p.path for p in load_dataset(data_root / "qmul-shoes" / "train").photos]


def distil(
    student: SketchPhotoEncoder, first: int, teacher: Embedder, ckpt: Checkpoint, photos: list[Path],
    epochs: int, n_views: int, lr: float,
) -> None:
    """Train the student's blocks from `first` on (and its head) towards the teacher's photo vectors, in place."""
    torch.manual_seed(0)
    rng = random.Random(0)
    prep = ckpt.preprocessing
    fronts, targets, pending = [], [], []
    t0 = time.perf_counter()
    for i, path in enumerate(photos):
        pending += [prepare_photo(v, prep) for v in views(load_photo(path, prep), n_views, rng)]
        if len(pending) >= 64 or i == len(photos) - 1:
            batch = np.stack(pending)
            targets.append(teacher.embed_arrays(batch, "photo"))
            with torch.no_grad():  # the frozen blocks run once per view
                h = student.trunk.stem(torch.from_numpy(batch))
                for block in student.trunk._blocks[:first]:
                    h = block(h)
            fronts.append(h)
            pending = []
    front, target = torch.cat(fronts), torch.from_numpy(np.concatenate(targets))
    print(f"# {len(front)} views cached in {time.perf_counter() - t0:.0f} s", flush=True)
    fit_photo_vectors(student, first, front, target, epochs, lr, "shallow")


def embedder_with_photos(ckpt: Checkpoint, photo_model: SketchPhotoEncoder | None) -> Embedder:
    """The model's embedder; with photo_model, photos go through that model's exported graph instead."""
    work = Path(tempfile.mkdtemp(dir=EXPORTS.name))
    emb = Embedder(ckpt, cache_dir=work)
    if photo_model is not None:
        prep = ckpt.preprocessing
        path = export_onnx(photo_model, "photo", prep.image_size, prep.channels, work / "shallow-photo.onnx")
        emb._sessions["photo"] = emb._load_session(path)
    return emb


def quality(ckpt: Checkpoint, variants: dict[str, Embedder], data_root: Path) -> None:
    suites = [
        ("held-out 10", load_dataset(data_root / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))),
        ("qmul-shoes/test", load_dataset(data_root / "qmul-shoes" / "test")),
    ]
    base = next(iter(variants.values()))
    print(f"# {ckpt.model_id}: sketches through the full model")
    print(f"{'suite':<16} {'photos':<22} {'k':>2} {'acc@1':>6} {'acc@10':>6} {'mAP@all':>8}")
    for name, data in suites:
        sketches = base.embed_sketches([s.path for s in data.sketches])
        for label, emb in variants.items():
            photos = embed_gallery(emb, data)
            for k in (0, 5):
                m = retrieval_metrics(sketches, blend_gallery(photos, k), data)
                acc = m.instance.acc
                map_all = f"{m.category.map_all:>8.3f}" if m.category else f"{'n/a':>8}"
                print(f"{name:<16} {label:<22} {k:>2} {acc[1]:>6.3f} {acc[10]:>6.3f} {map_all}", flush=True)


def speed(
    ckpt: Checkpoint, model: SketchPhotoEncoder, dropped: set[int], data_root: Path, rounds: int, n: int = 512
) -> None:
    arms = {"full": embedder_with_photos(ckpt, None), "shallow": embedder_with_photos(ckpt, shallow(model, dropped))}
    paths = sorted((data_root / "sketchy100" / "photo").glob("*/*.jpg"))[:n]
    prep = ckpt.preprocessing
    batch = np.stack([prepare_photo(load_photo(p, prep), prep) for p in paths[:32]])
    e2e: dict[str, list[float]] = {a: [] for a in arms}
    only: dict[str, list[float]] = {a: [] for a in arms}
    for emb in arms.values():
        emb.embed_photo_files(paths[:64])  # warm up
    for _ in range(rounds):
        for arm, emb in arms.items():
            t0 = time.perf_counter()
            emb.embed_photo_files(paths)
            e2e[arm].append(len(paths) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(4):
                emb.embed_arrays(batch, "photo")
            only[arm].append(4 * len(batch) / (time.perf_counter() - t0))
    print(f"# {ckpt.model_id}, dropped blocks {sorted(dropped)}, {len(paths)} photos of sketchy100, batch 32, "
          f"{rounds} alternating rounds, photos/s")
    print(f"{'graph':<8} {'model only (median)':>20} {'end to end (median)':>20}  end to end, each round")
    for arm in arms:
        print(f"{arm:<8} {statistics.median(only[arm]):>20.1f} {statistics.median(e2e[arm]):>20.1f}  "
              + " ".join(f"{r:.1f}" for r in e2e[arm]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--distil-epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--drop", default="", help="blocks to drop, comma-separated (default: picked per stage)")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    ckpt = load_checkpoint(None if args.model == "default" else args.model)
    model = ckpt.build()
    assert isinstance(model, SketchPhotoEncoder)
    if args.drop:
        dropped = {int(i) for i in args.drop.split(",")}
    else:
        sample = random.Random(1).sample(training_photos(args.data), 128)
        dropped = pick_dropped(model, np.stack([prepare_photo(load_photo(p, ckpt.preprocessing),
                                                              ckpt.preprocessing) for p in sample]))
    if args.speed:
        speed(ckpt, model, dropped, args.data, args.rounds)
        return
    variants = {"full model": embedder_with_photos(ckpt, None)}
    student = shallow(model, dropped)
    variants[f"without {len(dropped)} blocks"] = embedder_with_photos(ckpt, student)
    if args.distil_epochs:
        # the first fine-tuned block of the model, as the student numbers it
        first = sum(1 for i in range(default_first_trained_block(ckpt.config.arch)) if i not in dropped)
        photos = training_photos(args.data)
        distil(student, first, variants["full model"], ckpt, photos, args.distil_epochs, args.views, args.lr)
        variants[f"distilled {args.distil_epochs} ep"] = embedder_with_photos(ckpt, student)
    quality(ckpt, variants, args.data)


if __name__ == "__main__":
    main()
