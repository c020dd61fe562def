"""Query expansion (alpha-QE) and database-side augmentation on the held-out categories and qmul-shoes/test.

    .venv/bin/python bench/bench_rerank.py MODEL [--data ../shared/data]

MODEL is a checkpoint trained without the held-out categories. Prints acc@1 / acc@10 / mAP@all for the plain
cosine ranking and for re-ranking variants: the query is replaced by the normalised sum of itself and its top-k
photos, each weighted by its similarity cubed (alpha-QE, Radenovic et al.); database-side augmentation (DBA)
replaces each photo by the same kind of sum over its photo neighbours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, SketchyDataset, load_dataset
from encoder.embedder import Embedder
from encoder.evaluate import embed_gallery
from encoder.metrics import RetrievalMetrics, retrieval_metrics


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def expand(queries: np.ndarray, gallery: np.ndarray, k: int, alpha: float, self_weight: float = 1.0) -> np.ndarray:
    """alpha-QE: each query plus its k most similar gallery vectors weighted by similarity**alpha."""
    sim = queries @ gallery.T
    top = np.argsort(-sim, axis=1)[:, :k]
    w = np.clip(np.take_along_axis(sim, top, axis=1), 0, None) ** alpha
    return _normalise(self_weight * queries + np.einsum("qk,qkd->qd", w, gallery[top]))


def _row(label: str, m: RetrievalMetrics) -> str:
    return f"{label:<34} {m.instance.acc[1]:>6.3f} {m.instance.acc[10]:>6.3f} " + (
        f"{m.category.map_all:>8.3f}" if m.category else f"{'n/a':>8}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    embedder = Embedder(load_checkpoint(args.model))
    suites: list[tuple[str, SketchyDataset]] = [
        ("held-out 10", load_dataset(args.data / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))),
        ("qmul-shoes/test", load_dataset(args.data / "qmul-shoes" / "test")),
    ]
    for name, data in suites:
        photos = embed_gallery(embedder, data)  # an unreadable photo is an error, not a shifted index
        sketches = embedder.embed_sketches([s.path for s in data.sketches])
        print(f"\n{name}: {len(data.sketches)} sketches, {len(data.photos)} photos, {embedder.model_id}")
        print(f"{'ranking':<34} {'acc@1':>6} {'acc@10':>6} {'mAP@all':>8}")
        print(_row("cosine", retrieval_metrics(sketches, photos, data)))
        eye = np.eye(len(photos), dtype=np.float32)
        cos = sketches @ photos.T
        top10 = np.argsort(-cos, axis=1)[:, :10]
        for k in (1, 3, 5, 10):
            expanded = expand(sketches, photos, k, alpha=3.0)
            print(_row(f"alpha-QE k={k}", retrieval_metrics(expanded, photos, data)))
            # the first 10 places keep the cosine order; the expanded query orders the rest
            fused = expanded @ photos.T
            np.put_along_axis(fused, top10, 10.0 + np.take_along_axis(cos, top10, axis=1), axis=1)
            print(_row(f"cosine top 10, then alpha-QE k={k}", retrieval_metrics(fused, eye, data)))
        for k in (3, 5):
            dba = expand(photos, photos, k + 1, 3.0, self_weight=0.0)  # a photo is its own first neighbour
            print(_row(f"DBA k={k} (gallery side)", retrieval_metrics(sketches, dba, data)))


if __name__ == "__main__":
    main()
