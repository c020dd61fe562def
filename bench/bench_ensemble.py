"""Retrieval of several models' embeddings joined into one (their cosines averaged), beside each model alone.

    .venv/bin/python bench/bench_ensemble.py MODEL MODEL [MODEL ...] [--weights 1,1] [--data ../shared/data]

Joining L2-normalised embeddings side by side, each scaled by the square root of its weight, and normalising
again ranks exactly as the weighted mean of the models' cosines. A gallery would embed every photo once per
model, so the cost of a joined model is the sum of its parts' (see bench_embed.py for each part).
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


def _cells(data: SketchyDataset, sketches: np.ndarray, photos: np.ndarray) -> list[float]:
    m = retrieval_metrics(sketches, photos, data)
    cells = [m.instance.acc[1], m.instance.acc[3], m.instance.acc[10]]
    return cells + ([m.category.map_all] if m.category else [])


def _join(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    joined = np.concatenate([p * np.sqrt(w) for p, w in zip(parts, weights, strict=True)], axis=1)
    return joined / np.linalg.norm(joined, axis=1, keepdims=True).clip(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--weights", default="", help="comma-separated, one per model (default: equal)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(args.models)
    if len(weights) != len(args.models):
        parser.error("--weights needs one weight per model")
    suites = [
        load_dataset(args.data / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES)),
        load_dataset(args.data / "qmul-shoes" / "test"),
    ]
    # per suite, per model: (sketch embeddings, photo embeddings)
    embedded: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in suites]
    names = []
    for ref in args.models:
        ckpt = load_checkpoint(ref)  # "default" names the shipped model
        names.append(ckpt.model_id)
        embedder = Embedder(ckpt)
        for i, data in enumerate(suites):
            sketches = embedder.embed_sketches([s.path for s in data.sketches])
            embedded[i].append((sketches, embed_gallery(embedder, data)))
    header = f"{'model':<44} {'held-out acc@1':>14} {'acc@3':>6} {'acc@10':>7} {'mAP@all':>8}"
    print(header + f" {'shoes acc@1':>12} {'acc@3':>6} {'acc@10':>7}")

    def row(label: str, cells: list[float]) -> None:
        widths = [6, 7, 8, 12, 6, 7]
        rest = " ".join(f"{c:>{w}.3f}" for c, w in zip(cells[1:], widths, strict=True))
        print(f"{label:<44} {cells[0]:>14.3f} {rest}")

    for k, name in enumerate(names):
        row(name, [c for i, data in enumerate(suites) for c in _cells(data, *embedded[i][k])])
    joined = [
        c
        for i, data in enumerate(suites)
        for c in _cells(
            data,
            _join([s for s, _ in embedded[i]], weights),
            _join([p for _, p in embedded[i]], weights),
        )
    ]
    row("joined (weights " + ",".join(f"{w:g}" for w in weights) + ")", joined)


if __name__ == "__main__":
    main()
