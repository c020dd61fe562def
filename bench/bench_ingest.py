"""Embedded ingestion, end to end: photo files -> hashes -> embeddings -> the local Qdrant store, photos/s.

    .venv/bin/python bench/bench_ingest.py [--model default] [--data ../shared/data/sketchy100] [--gallery-neighbours K]

Runs the code `sketchsearch ingest` runs without a broker (an in-process job, one owner of the store) into
a fresh store under a temporary HOME, then the same folder again (every photo already present: the cost of
hashing and the id look-up alone).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from services.config import Settings
from services.gallery import load_active_model, open_gallery
from services.ingest import collect_photos
from services.jobs import FileJobStore, LocalJobRunner, follow_job
from services.vector_store import open_store

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sketchy100"


def run_once(runner: LocalJobRunner, photo_dir: Path) -> tuple[int, int, int, float]:
    t0 = time.perf_counter()
    files, rejected = collect_photos([photo_dir])
    job = runner.submit(files, label=None, rejected=rejected)
    job = follow_job(runner.jobs, job.id, poll_s=0.05)
    seconds = time.perf_counter() - t0
    summary = job.summary()
    return summary.added, summary.already_present, summary.failed, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="default", help="default, a shipped name or a checkpoint path")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Sketchy-layout folder (photo/)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--home", type=Path, default=None, help="HOME for the store (default: a temp folder)")
    parser.add_argument("--gallery-neighbours", type=int, default=None, help="default: the setting's (5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    photo_dir = args.data / "photo"
    if not photo_dir.is_dir():
        raise SystemExit(f"no photo/ folder under {args.data}")

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        home = args.home or Path(tmp)
        settings = Settings(home=home, model=args.model, batch_size=args.batch_size, threads=args.threads)
        if args.gallery_neighbours is not None:
            settings = settings.model_copy(update={"gallery_neighbours": args.gallery_neighbours})
        t0 = time.perf_counter()
        embedder = load_active_model(settings)
        load_s = time.perf_counter() - t0
        store = open_store(settings)
        try:
            gallery = open_gallery(store, embedder, create=True)
            runner = LocalJobRunner(gallery, FileJobStore(settings.jobs_path), settings.batch_size)
            fresh = run_once(runner, photo_dir)
            again = run_once(runner, photo_dir)
            runner.shutdown()
            stored = store.count_photos(gallery.collection)
        finally:
            store.close()

    print(
        f"# model {embedder.model_id} ({embedder.dim} d, {embedder.backend}), batch {args.batch_size}, "
        f"{os.cpu_count()} CPU cores, model load {load_s:.1f} s (not counted), {stored} photos stored, "
        f"gallery neighbours {settings.gallery_neighbours}"
    )
    print(f"{'run':<34} {'added':>6} {'present':>8} {'failed':>7} {'seconds':>8} {'photos/s':>9}")
    for name, (added, present, failed, seconds) in (
        ("fresh store (embed + upsert)", fresh),
        ("same folder again (skip known)", again),
    ):
        total = added + present + failed
        print(f"{name:<34} {added:>6} {present:>8} {failed:>7} {seconds:>8.1f} {total / seconds:>9.1f}")


if __name__ == "__main__":
    main()
