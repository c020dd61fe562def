"""Category mAP within and across domains on the held-out categories: sketch->photo, photo->photo, sketch->sketch.

    .venv/bin/python bench/bench_domains.py MODEL [MODEL ...] [--data ../shared/data]

MODEL is anything `sketchsearch eval --model` takes (a checkpoint trained without the held-out categories, or
`imagenet-lite1` for the raw ImageNet features). sketch->photo is `eval`'s mAP@all; the within-domain columns
rank every other image of the same domain (the query itself left out). They tell whether category ranking is
lost in the photo space itself or between the domains.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.embedder import Embedder
from encoder.evaluate import embed_gallery
from encoder.metrics import average_precision


def category_map(queries: np.ndarray, gallery: np.ndarray, q_cat: np.ndarray, g_cat: np.ndarray, same: bool) -> float:
    """mAP@all of category retrieval; with same=True the gallery is the queries and each leaves itself out."""
    sim = queries @ gallery.T
    aps = []
    for i in range(len(queries)):
        keep = np.arange(len(gallery)) != i if same else np.ones(len(gallery), dtype=bool)
        aps.append(average_precision(sim[i][keep], (g_cat == q_cat[i])[keep]))
    return float(np.mean(aps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    data = load_dataset(args.data / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))
    p_cat = np.array([p.category for p in data.photos])
    s_cat = np.array([s.category for s in data.sketches])
    print(f"held-out 10: {len(data.sketches)} sketches, {len(data.photos)} photos; category mAP@all")
    print(f"{'model':<40} {'sketch->photo':>13} {'photo->photo':>13} {'sketch->sketch':>14}")
    for ref in args.models:
        embedder = Embedder(load_checkpoint(ref))
        photos = embed_gallery(embedder, data)
        sketches = embedder.embed_sketches([s.path for s in data.sketches])
        print(
            f"{embedder.model_id:<40} {category_map(sketches, photos, s_cat, p_cat, False):>13.3f}"
            f" {category_map(photos, photos, p_cat, p_cat, True):>13.3f}"
            f" {category_map(sketches, sketches, s_cat, s_cat, True):>14.3f}"
        )


if __name__ == "__main__":
    main()
