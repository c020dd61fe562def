"""Photos embedded per second at batch 32 on this machine: ONNX Runtime vs torch, decode and resize included.

.venv/bin/python bench/bench_embed.py [--model default] [--photos 512] [--data ../shared/data/sketchy100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.embedder import load_embedder
from encoder.preprocess import prepare_photo_file


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
    args = parser.parse_args()
    paths = sorted((args.data / "photo").glob("*/*.jpg"))[: args.photos]
    if not paths:
        raise SystemExit(f"no photos under {args.data}/photo")

    rows = []
    ref = None if args.model == "default" else args.model
    prep = load_checkpoint(ref).preprocessing  # the model's own input size
    t0 = time.perf_counter()
    arrays = [prepare_photo_file(p, prep)[0] for p in paths]  # what embed_photo_files does in its threads
    decode_s = time.perf_counter() - t0
    rows.append(("decode+resize only (1 thread)", len(paths) / decode_s))
    batch = np.stack(arrays[: args.batch_size])
    for backend in ("onnx", "torch"):
        emb = load_embedder(ref, backend=backend)
        emb.embed_photo_files(paths[: args.batch_size], batch_size=args.batch_size)  # warm up
        t0 = time.perf_counter()
        result = emb.embed_photo_files(paths, batch_size=args.batch_size)
        total = time.perf_counter() - t0
        assert len(result.paths) == len(paths)
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            emb.embed_arrays(batch, "photo")
        model_s = (time.perf_counter() - t0) / (reps * len(batch))
        rows.append((f"{backend}: end to end (decode, resize, embed)", len(paths) / total))
        rows.append((f"{backend}: model only", 1.0 / model_s))
        print(
            f"# {backend}: model {emb.model_id}, {prep.image_size} px, "
            f"{1000 * model_s:.2f} ms per photo at batch {len(batch)}"
        )
    print(f"\n{'measure':<45} {'photos/s':>10}")
    for name, value in rows:
        print(f"{name:<45} {value:>10.1f}")


if __name__ == "__main__":
    main()
