"""Other views of each gallery photo: the photo mirrored, and the photo joined with its HED pseudo-sketch.

    .venv/bin/python bench/bench_gallery_views.py MODEL [--data ../shared/data] [--pseudo DIR] [--shoes-pseudo DIR]
        [--weights 0.25,0.5,1]

MODEL is a checkpoint trained without the held-out categories. Prints acc@1 / acc@3 / acc@10 / mAP@all of the
held-out categories (and of qmul-shoes/test with --shoes-pseudo) for:
- the plain cosine ranking against the photos (what `eval` and search do);
- the gallery mirrored: how much the model relies on which way a thing faces;
- each photo's vector replaced by normalise(photo + w * its pseudo-sketch's vector, embedded as a sketch), for each
  w of --weights, and the pseudo-sketches alone. The pseudo-sketches come from `python -m encoder.pseudo_sketch`
  (`make pseudo` writes sketchy100's to .cache/pseudo/sketchy100; the shoes' test photos need a run of their own).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import ImageOps

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, SketchyDataset, load_dataset
from encoder.embedder import Embedder
from encoder.metrics import RetrievalMetrics, retrieval_metrics
from encoder.preprocess import load_photo


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _row(label: str, m: RetrievalMetrics) -> str:
    acc = m.instance.acc
    return f"{label:<40} {acc[1]:>6.3f} {acc[3]:>6.3f} {acc[10]:>6.3f} " + (
        f"{m.category.map_all:>8.3f}" if m.category else f"{'n/a':>8}"
    )


def report(embedder: Embedder, name: str, data: SketchyDataset, pseudo: Path | None, weights: list[float]) -> None:
    # decoded once for both galleries; an unreadable photo raises here rather than shifting the index
    decoded = [load_photo(p.path, embedder.prep) for p in data.photos]
    photos = embedder.embed_photos(decoded)
    mirrored = embedder.embed_photos([ImageOps.mirror(photo) for photo in decoded])
    sketches = embedder.embed_sketches([s.path for s in data.sketches])
    print(f"\n{name}: {len(data.sketches)} sketches, {len(data.photos)} photos, {embedder.model_id}")
    print(f"{'gallery vectors':<40} {'acc@1':>6} {'acc@3':>6} {'acc@10':>6} {'mAP@all':>8}")
    print(_row("photos (cosine)", retrieval_metrics(sketches, photos, data)))
    print(_row("photos mirrored", retrieval_metrics(sketches, mirrored, data)))
    print(f"{'':<40} mean cosine of a photo and its mirror image: {float((photos * mirrored).sum(1).mean()):.3f}")
    if pseudo is None:
        return
    edges = embedder.embed_sketches([pseudo / p.category / f"{p.stem}.png" for p in data.photos])
    for w in weights:
        print(_row(f"photo + {w:g} x pseudo-sketch", retrieval_metrics(sketches, _normalise(photos + w * edges), data)))
    print(_row("pseudo-sketches alone", retrieval_metrics(sketches, edges, data)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--pseudo", type=Path, default=Path(".cache/pseudo/sketchy100"))
    parser.add_argument("--shoes-pseudo", type=Path, default=None)
    parser.add_argument("--weights", default="0.25,0.5,1")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",") if w]
    embedder = Embedder(load_checkpoint(args.model))
    held_out = load_dataset(args.data / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))
    report(embedder, "held-out 10", held_out, args.pseudo, weights)
    report(embedder, "qmul-shoes/test", load_dataset(args.data / "qmul-shoes" / "test"), args.shoes_pseudo, weights)


if __name__ == "__main__":
    main()
