"""Whitening fitted on the training split, on the held-out categories and qmul-shoes/test.

    .venv/bin/python bench/bench_whitening.py MODEL [--data ../shared/data] [--powers 0.125,0.25,0.5]

MODEL is a checkpoint trained without the held-out categories (`sketchsearch train --holdout ...`); a whitened
one is measured without its whitening (the weights before it are unchanged).
The whitening is fitted, as `train --whiten-power` and `sketchsearch whiten` fit it, on the embeddings of the
paired human sketches and all photos of the training split (sketchy100 minus the held-out categories, and
qmul-shoes/train); each row prints acc@1 / acc@10 / mAP@all on the held-out categories and acc@1 / acc@10 on the
shoes, against the plain cosine ranking in the first row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, SketchyDataset, load_dataset
from encoder.embedder import Embedder
from encoder.evaluate import embed_gallery
from encoder.metrics import retrieval_metrics
from encoder.whitening import fit_whitening


def _embed(embedder: Embedder, data: SketchyDataset, paired_only: bool) -> tuple[np.ndarray, np.ndarray]:
    sketches = sorted({s for s, _ in data.instance_pairs()}) if paired_only else range(len(data.sketches))
    return (
        embedder.embed_sketches([data.sketches[i].path for i in sketches]),
        embed_gallery(embedder, data),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--powers", default="0.125,0.25,0.375,0.5")
    parser.add_argument("--shrinks", default="0.03,0.1,0.3,1.0")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.model)
    if ckpt.config.pooled_weight > 0:
        print(f"{ckpt.model_id} joins the pooled vector: measured without the join")
        ckpt = ckpt.without_pooled_join()
    if ckpt.config.whiten:
        print(f"{ckpt.model_id} is whitened: measured without its whitening")
        ckpt = ckpt.without_whitening()
    embedder = Embedder(ckpt)
    held = set(HELD_OUT_CATEGORIES)
    train_sets = [
        load_dataset(args.data / "sketchy100").subset(exclude=held),
        load_dataset(args.data / "qmul-shoes" / "train"),
    ]
    fitted = [_embed(embedder, d, paired_only=True) for d in train_sets]
    fit_sketches = np.concatenate([s for s, _ in fitted])
    fit_photos = np.concatenate([p for _, p in fitted])
    suites = [
        load_dataset(args.data / "sketchy100").subset(categories=held),
        load_dataset(args.data / "qmul-shoes" / "test"),
    ]
    tests = [(d, *_embed(embedder, d, paired_only=False)) for d in suites]
    print(f"{ckpt.model_id}: whitening fitted on {len(fit_sketches)} sketches and {len(fit_photos)} photos")
    print(f"{'whitening':<22} {'held-out acc@1':>14} {'acc@10':>7} {'mAP@all':>8} {'shoes acc@1':>12} {'acc@10':>7}")

    def row(label: str, mean: np.ndarray | None, matrix: np.ndarray | None) -> None:
        cells = []
        for data, sk, ph in tests:
            if mean is not None and matrix is not None:
                sk, ph = ((x - mean) @ matrix for x in (sk, ph))
                sk, ph = (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12) for x in (sk, ph))
            m = retrieval_metrics(sk, ph, data)
            cells += [m.instance.acc[1], m.instance.acc[10]]
            if m.category:
                cells.append(m.category.map_all)
        print(f"{label:<22} {cells[0]:>14.3f} {cells[1]:>7.3f} {cells[2]:>8.3f} {cells[3]:>12.3f} {cells[4]:>7.3f}")

    row("none (cosine)", None, None)
    for power in (float(p) for p in args.powers.split(",")):
        for shrink in (float(s) for s in args.shrinks.split(",")):
            row(f"power {power:g}, shrink {shrink:g}", *fit_whitening(fit_sketches, fit_photos, power, shrink))


if __name__ == "__main__":
    main()
