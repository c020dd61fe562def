"""Zero-shot effect of sketch BatchNorm statistics (AdaBN) on raw ImageNet EfficientNet-Lite0 features.

    .venv/bin/python bench/bench_sketch_norm.py [--data ../shared/data/sketchy100] [--sketches 640] [--size 224]

Raw pooled features, no training: photos use the ImageNet statistics; sketches use either the same ones or
statistics averaged over sketches of the 90 training categories. Scored on the 10 held-out categories.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.metrics import retrieval_metrics
from encoder.model import ModelConfig, SketchPhotoEncoder, build_model, load_imagenet_weights
from encoder.preprocess import Preprocessing, load_photo, load_sketch, prepare_photo, prepare_sketch
from encoder.train import estimate_sketch_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sketchy100"
    )
    parser.add_argument("--sketches", type=int, default=640, help="training sketches averaged for the statistics")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    held_out = dataset.subset(categories=set(HELD_OUT_CATEGORIES))
    training = dataset.subset(exclude=set(HELD_OUT_CATEGORIES))
    prep = Preprocessing(image_size=args.size)
    model = build_model(ModelConfig(embed_dim=0, image_size=args.size, sketch_norm=True))
    assert isinstance(model, SketchPhotoEncoder)
    load_imagenet_weights(model.trunk, "lite0")
    model.eval()

    def embed(arrays: list[np.ndarray], domain: str) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate(
                [model.embed(torch.from_numpy(np.stack(arrays[i : i + 32])), domain).numpy()
                 for i in range(0, len(arrays), 32)]
            )

    photos = embed([prepare_photo(load_photo(p.path, prep), prep) for p in held_out.photos], "photo")
    sketches = [prepare_sketch(load_sketch(s.path, prep), prep) for s in held_out.sketches]
    rows = [("ImageNet statistics for both", retrieval_metrics(embed(sketches, "sketch"), photos, held_out))]
    t0 = time.perf_counter()
    sample = random.Random(0).sample(training.sketches, min(args.sketches, len(training.sketches)))
    arrays = [prepare_sketch(load_sketch(s.path, prep), prep) for s in sample]
    estimate_sketch_norm(model, [torch.from_numpy(np.stack(arrays[i : i + 64])) for i in range(0, len(arrays), 64)])
    seconds = time.perf_counter() - t0
    rows.append((f"sketch statistics ({len(sample)} sketches, {seconds:.0f} s)",
                 retrieval_metrics(embed(sketches, "sketch"), photos, held_out)))
    print(f"{'sketches normalised with':<44} {'acc@1':>6} {'acc@10':>6} {'mAP@all':>8}")
    for name, r in rows:
        print(f"{name:<44} {r.instance.acc[1]:>6.3f} {r.instance.acc[10]:>6.3f} {r.map_all:>8.3f}")


if __name__ == "__main__":
    main()
