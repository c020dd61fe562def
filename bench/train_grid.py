"""Several training runs side by side (one process each, e.g. on a lent GPU), then one table of their results.

    .venv/bin/python bench/train_grid.py DATA_DIR --pseudo DIR [--pseudo DIR] --val DIR --out /tmp/runs \\
        NAME='{"seed": 0}' NAME2='{"epochs": 24, "seed": 1}' F_NAME='{"full": true, "select_best": false}'

Each NAME=JSON is one run: JSON sets TrainConfig fields; "full": true trains on every category, otherwise the
held-out 10 are kept out. Runs write OUT/NAME.pt (fp16), OUT/NAME.log and OUT/NAME.json. The table gives each
run's last epoch and its best epoch by the validation score, from its checkpoint's history.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path


def run_one(name: str, spec: dict, args: argparse.Namespace) -> None:
    from encoder.checkpoint import save_checkpoint
    from encoder.data import HELD_OUT_CATEGORIES
    from encoder.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    full = bool(spec.pop("full", False))
    cfg = TrainConfig(
        pseudo_dirs=[str(p) for p in args.pseudo],
        val_dirs=[str(v) for v in args.val],
        holdout=[] if full else sorted(HELD_OUT_CATEGORIES),
        **spec,
    )
    t0 = time.time()
    ckpt = train([args.data], cfg, args.out / f"{name}.pt", progress=False, max_pairs=args.max_pairs)
    save_checkpoint(ckpt, args.out / f"{name}.pt", half=True)
    summary = {"name": name, "full": full, "spec": spec, "model_id": ckpt.model_id, "seconds": time.time() - t0}
    (args.out / f"{name}.json").write_text(json.dumps({**summary, "metrics": ckpt.metrics}, default=str))


def print_table(names: list[str], out: Path) -> None:
    print(f"{'run':<12} {'epochs':>6}  {'last epoch (per suite: acc@1 / acc@10 / mAP)':<70} best epoch  minutes")
    for name in names:
        path = out / f"{name}.json"
        if not path.is_file():
            print(f"{name:<12} failed: see {out / (name + '.log')}")
            continue
        result = json.loads(path.read_text())
        history = result["metrics"]["history"]
        last = history[-1]["val"] if history else ""
        print(
            f"{name:<12} {len(history):>6}  {last:<70} {result['metrics']['best_epoch']:>10}"
            f"  {result['seconds'] / 60:>7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("runs", nargs="+", help="NAME=JSON, e.g. x24='{\"epochs\": 24}'")
    parser.add_argument("--pseudo", type=Path, action="append", default=[])
    parser.add_argument("--val", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--max-pairs", type=int, default=None, help="a smoke test: train on this many pairs only")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(r.split("=", 1)[0], json.loads(r.split("=", 1)[1])) for r in args.runs]
    if args.one:
        run_one(*runs[0], args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, __file__, str(args.data), "--out", str(args.out), "--one"]
    base += [f"--pseudo={p}" for p in args.pseudo] + [f"--val={v}" for v in args.val]
    if args.max_pairs:
        base += ["--max-pairs", str(args.max_pairs)]
    procs = []
    for name, spec in runs:
        with open(args.out / f"{name}.log", "w") as log:
            cmd = [*base, f"{name}={json.dumps(spec)}"]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    for proc in procs:
        proc.wait()
    print_table([name for name, _ in runs], args.out)


if __name__ == "__main__":
    main()
