"""Gallery neighbours: retrieval with photos blended with their k nearest photos, and the store's upkeep of them.

    .venv/bin/python bench/bench_gallery_neighbours.py MODEL [--data ../shared/data] [--ks 0,3,5,10]
    .venv/bin/python bench/bench_gallery_neighbours.py MODEL --store [--store-data DIR] [--server-path]

MODEL is a checkpoint trained without the held-out categories. The first form prints acc@1/5/10, mAP@all and the
stored threshold's recall / precision on the held-out categories and qmul-shoes/test for each k (0: the photo
embeddings alone, what eval ranked by before the sixteenth session), plus the threshold each k would calibrate.
--store embeds every photo of a folder (default sketchy100), writes them into a fresh embedded store in shuffled
batches of 64 (as ingestion jobs do) with k = 0 and with the default k, and prints the write time and how far the
store's gallery vectors are from blending the whole gallery at once (encoder.neighbours.blend_gallery);
--server-path adds the way a server's stores blend (queries and payload floors), run on local mode, and then
`sketchsearch reblend`'s exact pass over the whole collection.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from encoder.data import HELD_OUT_CATEGORIES, SketchyDataset, load_dataset
from encoder.embedder import Embedder, load_embedder
from encoder.evaluate import embed_gallery
from encoder.metrics import retrieval_metrics
from encoder.neighbours import blend_gallery
from services.config import Settings
from services.vector_store import PHOTO_VECTOR, PhotoRecord, open_store, photo_id

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def quality(embedder: Embedder, data_root: Path, ks: list[int]) -> None:
    suites: list[tuple[str, SketchyDataset]] = [
        ("held-out 10", load_dataset(data_root / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))),
        ("qmul-shoes/test", load_dataset(data_root / "qmul-shoes" / "test")),
    ]
    print(f"# {embedder.model_id}, stored threshold {embedder.threshold}")
    print(
        f"{'suite':<16} {'k':>3} {'acc@1':>6} {'acc@5':>6} {'acc@10':>6} {'mAP@all':>8} {'recall':>7} "
        f"{'precision':>9} {'calibrated':>10}"
    )
    for name, data in suites:
        photos = embed_gallery(embedder, data)
        sketches = embedder.embed_sketches([s.path for s in data.sketches])
        for k in ks:
            gallery = blend_gallery(photos, k)
            m = retrieval_metrics(sketches, gallery, data, threshold=embedder.threshold)
            acc, th = m.instance.acc, m.threshold
            calibrated = retrieval_metrics(sketches, gallery, data).threshold.value  # none given: fitted
            map_all = f"{m.category.map_all:>8.3f}" if m.category else f"{'n/a':>8}"
            print(
                f"{name:<16} {k:>3} {acc[1]:>6.3f} {acc[5]:>6.3f} {acc[10]:>6.3f} {map_all} "
                f"{th.recall:>7.3f} {th.precision:>9.3f} {calibrated:>10.3f}"
            )


def store_upkeep(embedder: Embedder, folder: Path, k: int, server_path: bool) -> None:
    data = load_dataset(folder)
    t0 = time.perf_counter()
    vectors = embed_gallery(embedder, data, batch_size=64)
    embed_s = time.perf_counter() - t0
    records = [
        PhotoRecord(photo_id(hashlib.sha256(str(p.path).encode()).hexdigest()), str(p.path), p.category, "", 0, 0, "")
        for p in data.photos
    ]
    ids = [r.id for r in records]
    order = np.random.default_rng(0).permutation(len(records))
    expected = blend_gallery(vectors, k)
    print(f"# {len(records)} photos of {folder}, {embedder.model_id}; embedding took {embed_s:.1f} s (not counted)")
    print(
        f"{'k':>3} {'path':<22} {'write s':>8} {'photos/s':>9} {'max |diff|':>10} {'rows off':>9} {'top-1 differs':>14}"
    )
    runs = [(0, "embedded"), (k, "embedded")] + ([(k, "server")] if server_path else [])
    for kk, path in runs:
        rows_out: list[tuple[str, float, np.ndarray]] = []
        with tempfile.TemporaryDirectory(prefix="bench-neighbours-") as tmp:
            store = open_store(Settings(home=Path(tmp), gallery_neighbours=kk))
            try:
                name = store.ensure_collection(embedder.model_id, embedder.dim)
                store.embedded = path == "embedded"  # "server": blend through queries, as against a server
                t0 = time.perf_counter()
                for start in range(0, len(order), 64):
                    rows = order[start : start + 64]
                    store.upsert_photos(name, [records[i] for i in rows], vectors[rows])
                rows_out.append((path, time.perf_counter() - t0, store.read_vectors(name, ids)))
                assert np.allclose(store.read_vectors(name, ids, PHOTO_VECTOR), vectors, atol=1e-5)
                if path == "server":
                    # then `sketchsearch reblend`: the whole gallery blended again at once (its seconds, not a write's)
                    t0 = time.perf_counter()
                    changed, _ = store.reblend(name)
                    rows_out.append((f"reblend ({changed} rewritten)", time.perf_counter() - t0,
                                     store.read_vectors(name, ids)))
            finally:
                store.close()
        want = expected if kk else vectors
        for label, seconds, stored in rows_out:
            diff = np.abs(stored - want).max(axis=1)
            # does any photo's nearest photo by gallery vector change? (a ranking-level view of the difference)
            sims_s, sims_w = stored @ stored.T, want @ want.T
            np.fill_diagonal(sims_s, -2)
            np.fill_diagonal(sims_w, -2)
            top1 = int((sims_s.argmax(axis=1) != sims_w.argmax(axis=1)).sum())
            print(
                f"{kk:>3} {label:<22} {seconds:>8.1f} {len(records) / seconds:>9.1f} {diff.max():>10.2e} "
                f"{int((diff > 1e-4).sum()):>9} {top1:>14}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--ks", default="0,3,5,10")
    parser.add_argument("--store", action="store_true", help="measure the store's upkeep instead")
    parser.add_argument("--store-data", type=Path, default=DATA / "sketchy100")
    parser.add_argument(
        "--server-path",
        action="store_true",
        help="with --store: also blend through queries "
        "(a server's way; slow on local mode, which scans every point per query)",
    )
    args = parser.parse_args()
    embedder = load_embedder(args.model)
    if args.store:
        store_upkeep(embedder, args.store_data, Settings().gallery_neighbours, args.server_path)
    else:
        quality(embedder, args.data, [int(k) for k in args.ks.split(",")])


if __name__ == "__main__":
    main()
