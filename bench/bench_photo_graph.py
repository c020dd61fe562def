"""Where a model's exported photo graph spends its time in ONNX Runtime: threads, sub-batches, operator profile.

.venv/bin/python bench/bench_photo_graph.py [--model default] [--rounds 6]

Model only (random inputs, no decoding), batch 32, to see whether the graph itself can run faster on this CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.export import export_onnx

BATCH = 32


def _session(path: Path, threads: int, profile: bool = False) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = profile
    if profile:
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rate(run: object, x: np.ndarray, sub: int, passes: int = 2) -> float:
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(x), sub):
            run.run(None, {"image": x[i : i + sub]})  # type: ignore[attr-defined]
    return passes * len(x) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    ckpt = load_checkpoint(None if args.model == "default" else args.model)
    prep = ckpt.preprocessing
    work = Path(tempfile.mkdtemp())
    path = export_onnx(ckpt.build(), "photo", prep.image_size, prep.channels, work / "photo.onnx")
    x = np.random.default_rng(0).standard_normal((BATCH, prep.channels, prep.image_size, prep.image_size))
    x = x.astype(np.float32)
    print(f"# {ckpt.model_id}, {prep.image_size} px, batch {BATCH}, {args.rounds} rounds, model only")

    # sub-batches: the same 32 inputs as 1, 4 or 8 calls, alternating round by round
    two = _session(path, 2)
    subs: dict[int, list[float]] = {32: [], 8: [], 4: []}
    for sub in subs:
        _rate(two, x, sub, passes=1)
    for _ in range(args.rounds):
        for sub, rates in subs.items():
            rates.append(_rate(two, x, sub))
    print(f"\n{'how':<45} {'photos/s (median)':>18}")
    for sub, rates in subs.items():
        print(f"{f'2 threads, {BATCH // sub} call(s) of {sub}':<45} {statistics.median(rates):>18.1f}")

    one = _session(path, 1)
    _rate(one, x, BATCH, passes=1)
    print(f"{'1 thread, 1 call of 32':<45} {statistics.median(_rate(one, x, BATCH) for _ in range(2)):>18.1f}")
    pair = [_session(path, 1), _session(path, 1)]
    for s in pair:
        _rate(s, x, BATCH, passes=1)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=_rate, args=(s, x, BATCH, 3)) for s in pair]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"{'two 1-thread sessions side by side':<45} {2 * 3 * BATCH / (time.perf_counter() - t0):>18.1f}")

    profiled = _session(path, 2, profile=True)
    for _ in range(3):
        profiled.run(None, {"image": x})  # type: ignore[attr-defined]
    events = json.loads(Path(profiled.end_profiling()).read_text())  # type: ignore[attr-defined]
    by_op: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    total = sum(by_op.values())
    print(f"\n{'operator':<45} {'share of time':>18}")
    for op, dur in by_op.most_common(5):
        print(f"{op:<45} {dur / total:>18.1%}")
    print(f"\n{'node (the costliest)':<45} {'share of time':>18}")
    for node, dur in by_node.most_common(8):
        print(f"{node[:45]:<45} {dur / total:>18.1%}")


if __name__ == "__main__":
    main()
