"""Photos embedded per second at batch 32 on this machine: ONNX Runtime vs torch, decode and resize included.

.venv/bin/python bench/bench_embed.py [--model default] [--photos 512] [--data ../shared/data/sketchy100] [--runs 1]

This machine's speed moves by a factor of two or more between days and by a third within an hour
(docs/BENCHMARKS.md), so --runs N repeats decoding alone and the ONNX Runtime runs N times and prints each run
with the median; decoding alone, one thread, is the run's measure of the machine itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.embedder import Embedder, load_embedder
from encoder.preprocess import Preprocessing, prepare_photo_file


def measure_decode(paths: list[Path], prep: Preprocessing) -> tuple[float, list[np.ndarray]]:
    """Photos per second decoded and resized in one thread, as embed_photo_files does in its threads."""
    t0 = time.perf_counter()
    arrays = [prepare_photo_file(p, prep)[0] for p in paths]
    return len(paths) / (time.perf_counter() - t0), arrays


def measure_embedder(emb: Embedder, paths: list[Path], batch: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(end to end, model only) photos per second: decode, resize and embed every photo; then one batch, 5 times."""
    t0 = time.perf_counter()
    result = emb.embed_photo_files(paths, batch_size=batch_size)
    total = time.perf_counter() - t0
    assert len(result.paths) == len(paths)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        emb.embed_arrays(batch, "photo")
    return len(paths) / total, reps * len(batch) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sketchy100",
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat decoding alone and ONNX Runtime this many times")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    paths = sorted((args.data / "photo").glob("*/*.jpg"))[: args.photos]
    if not paths:
        raise SystemExit(f"no photos under {args.data}/photo")

    rows = []
    ref = None if args.model == "default" else args.model
    prep = load_checkpoint(ref).preprocessing  # the model's own input size
    decode_rate, arrays = measure_decode(paths, prep)
    rows.append(("decode+resize only (1 thread)", decode_rate))
    batch = np.stack(arrays[: args.batch_size])
    onnx: Embedder | None = None  # kept for --runs
    runs: list[tuple[float, float, float]] = []  # ONNX Runtime: (decoding alone, end to end, model only)
    for backend in ("onnx", "torch"):
        emb = load_embedder(ref, backend=backend)
        emb.embed_photo_files(paths[: args.batch_size], batch_size=args.batch_size)  # warm up
        end_to_end, model_only = measure_embedder(emb, paths, batch, args.batch_size)
        if backend == "onnx":
            onnx = emb
            runs.append((decode_rate, end_to_end, model_only))
        rows.append((f"{backend}: end to end (decode, resize, embed)", end_to_end))
        rows.append((f"{backend}: model only", model_only))
        print(
            f"# {backend}: model {emb.model_id}, {prep.image_size} px, "
            f"{1000 / model_only:.2f} ms per photo at batch {len(batch)}"
        )
    print(f"\n{'measure':<45} {'photos/s':>10}")
    for name, value in rows:
        print(f"{name:<45} {value:>10.1f}")
    if args.runs == 1:
        return
    assert onnx is not None
    for _ in range(args.runs - 1):
        decode_rate, _ = measure_decode(paths, prep)
        runs.append((decode_rate, *measure_embedder(onnx, paths, batch, args.batch_size)))
    print(f"\n{'onnx, run':<12} {'decode alone':>13} {'end to end':>11} {'model only':>11}")
    for i, (decode_rate, end_to_end, model_only) in enumerate(runs, 1):
        print(f"{i:<12} {decode_rate:>13.1f} {end_to_end:>11.1f} {model_only:>11.1f}")
    medians = [statistics.median(column) for column in zip(*runs, strict=True)]
    print(f"{'median':<12} {medians[0]:>13.1f} {medians[1]:>11.1f} {medians[2]:>11.1f}")


if __name__ == "__main__":
    main()
