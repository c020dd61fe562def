"""Retrieval quality of several models side by side on the held-out categories and on qmul-shoes/test.

    .venv/bin/python bench/bench_models.py MODEL [MODEL ...] [--data ../shared/data] [--json out.json]

MODEL is anything `sketchsearch eval --model` takes: a checkpoint path, `default`, `imagenet-lite0`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES
from encoder.embedder import Embedder
from encoder.evaluate import evaluate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sketch-flip", action="store_true", help="also evaluate each model with sketch flip TTA")
    args = parser.parse_args()
    suites = [
        ("held-out 10 (sketchy100)", args.data / "sketchy100", set(HELD_OUT_CATEGORIES)),
        ("qmul-shoes/test", args.data / "qmul-shoes" / "test", None),
    ]
    rows = []
    for ref in args.models:
        ckpt = load_checkpoint(None if ref == "default" else ref)
        variants = [(ref, ckpt)]
        if args.sketch_flip:
            from dataclasses import replace

            flipped = replace(ckpt, preprocessing=replace(ckpt.preprocessing, sketch_flip=True))
            variants.append((f"{ref} +flip", flipped))
        for label, variant in variants:
            embedder = Embedder(variant)
            train_s = variant.metrics.get("train_seconds")
            for suite, root, cats in suites:
                report = evaluate_dataset(root, embedder, categories=cats)
                rows.append({**report.to_json(), "label": label, "suite": suite, "train_s": train_s})
    print(f"{'model':<34} {'suite':<26} {'acc@1':>6} {'acc@3':>6} {'acc@5':>6} {'acc@10':>6} {'mAP@all':>8} "
          f"{'thr recall':>10} {'train min':>9}")
    for r in rows:
        inst, cat = r["instance"], r["category"] or {}
        m = cat.get("mAP@all")
        print(f"{r['label'][-34:]:<34} {r['suite']:<26} {inst['acc@1']:>6.3f} {inst['acc@3']:>6.3f} "
              f"{inst['acc@5']:>6.3f} {inst['acc@10']:>6.3f} {m if m is None else round(m, 3)!s:>8} "
              f"{r['threshold']['recall']:>10.3f} {(r['train_s'] or 0) / 60:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
