"""Search latency, sketch in -> hits out, p50/p95 at 10k and 100k stored vectors in the embedded store.

    .venv/bin/python bench/bench_search.py [--model default] [--sizes 10000 100000] [--queries 100]

Synthetic unit vectors (the model's dimension, 100 categories) fill the model's collection; the queries are
real sketchy100 sketches through search_sketch(), i.e. decode + embed + store query, as `sketchsearch search`
does once the store is open. Qdrant's local mode scores every vector (brute force, numpy) and filters payloads
in Python; a Qdrant server (SKETCHSEARCH_QDRANT_URL) uses HNSW and payload indexes instead.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.config import Settings
from services.gallery import Gallery, load_active_model, open_gallery
from services.search import search_sketch
from services.vector_store import PhotoRecord, open_store, photo_id

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sketchy100"
FILL_BATCH = 2000


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return statistics.median(ordered), p95


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def synthetic(
    start: int, count: int, dim: int, rng: np.random.Generator
) -> tuple[list[PhotoRecord], np.ndarray]:
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = []
    for i in range(start, start + count):
        sha = hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()
        category = f"c{i % 100:02d}"
        path = f"/synthetic/{category}/{i}.jpg"
        records.append(PhotoRecord(photo_id(sha), path, category, sha, 640, 480, "2024-01-01T00:00:00+00:00"))
    return records, vectors


Percentiles = tuple[float, float]


def measure(gallery: Gallery, sketches: list[Path], top_k: int) -> tuple[Percentiles, ...]:
    """p50/p95 of: the whole search, the sketch embedding alone, the store query alone, a filtered query."""
    queue = iter(sketches * 3)
    search_sketch(gallery, sketches[0], top_k=top_k)  # warm-up
    total = timed(lambda: search_sketch(gallery, next(queue), top_k=top_k), len(sketches))
    embed = timed(lambda: gallery.embedder.embed_sketch(next(queue)), len(sketches))
    vector = gallery.embedder.embed_sketch(sketches[0])
    store, name = gallery.store, gallery.collection
    query = timed(lambda: store.search(name, vector, top_k), len(sketches))
    filtered = timed(lambda: store.search(name, vector, top_k, category="c07"), 20)
    return percentiles(total), percentiles(embed), percentiles(query), percentiles(filtered)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="default", help="default, a shipped name or a checkpoint path")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Sketchy-layout folder (sketch/)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sketches = sorted((args.data / "sketch").glob("*/*.png"))[::7][: args.queries]
    if not sketches:
        raise SystemExit(f"no sketches under {args.data}/sketch")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        # gallery neighbours change what is stored, not what a search costs: the synthetic fill skips them
        settings = Settings(home=Path(tmp), model=args.model, gallery_neighbours=0)
        embedder = load_active_model(settings)
        rng = np.random.default_rng(0)
        stored = 0
        for size in sorted(args.sizes):
            store = open_store(settings)
            gallery = open_gallery(store, embedder, create=True)
            t0 = time.perf_counter()
            while stored < size:
                n = min(FILL_BATCH, size - stored)
                store.upsert_photos(gallery.collection, *synthetic(stored, n, embedder.dim, rng))
                stored += n
            fill_s = time.perf_counter() - t0
            store.close()
            # reopen: what a new `sketchsearch search` process pays before its first query
            t0 = time.perf_counter()
            store = open_store(settings)
            gallery = open_gallery(store, embedder, create=False)
            open_s = time.perf_counter() - t0
            assert store.count_photos(gallery.collection) == size

            latencies = measure(gallery, sketches, args.top_k)
            store.close()
            rows.append((size, *latencies, fill_s, open_s))

    print(
        f"# model {embedder.model_id} ({embedder.dim} d, {embedder.backend}), top-{args.top_k}, "
        f"{len(sketches)} sketch queries, embedded store (qdrant-client local mode, brute force)"
    )
    print(
        f"{'vectors':>8} | {'search p50':>10} {'p95':>7} | {'embed p50':>9} {'p95':>7} | "
        f"{'store p50':>9} {'p95':>7} | {'category-filtered p50':>21} | {'fill s':>6} | {'open s':>6}"
    )
    for size, tot, emb, qry, flt, fill_s, open_s in rows:
        print(
            f"{size:>8} | {tot[0]:>8.1f}ms {tot[1]:>5.1f}ms | {emb[0]:>7.1f}ms {emb[1]:>5.1f}ms | "
            f"{qry[0]:>7.1f}ms {qry[1]:>5.1f}ms | {flt[0]:>19.1f}ms | {fill_s:>6.1f} | {open_s:>6.1f}"
        )


if __name__ == "__main__":
    main()
