"""Category mAP within and across domains on the held-out categories: sketch->photo, photo->photo, sketch->sketch.

    .venv/bin/python bench/bench_domains.py MODEL [MODEL ...] [--data ../shared/data] [--layers]

MODEL is anything `sketchsearch eval --model` takes (a checkpoint trained without the held-out categories, or
`imagenet-lite1` for the raw ImageNet features). sketch->photo is `eval`'s mAP@all; the within-domain columns
rank every other image of the same domain (the query itself left out). They tell whether category ranking is
lost in the photo space itself or between the domains. With --layers, the same for each stage of a trained
model (torch): the trunk's final pooled vector, the head's whole input (that vector and the pooled mid-level
taps), the head's output and the embedding (whitened, joined), each L2-normalised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.embedder import Embedder
from encoder.evaluate import embed_gallery
from encoder.metrics import average_precision
from encoder.model import POOLED_DIM, SketchPhotoEncoder
from encoder.train import photo_input, sketch_input


def category_map(queries: np.ndarray, gallery: np.ndarray, q_cat: np.ndarray, g_cat: np.ndarray, same: bool) -> float:
    """mAP@all of category retrieval; with same=True the gallery is the queries and each leaves itself out."""
    sim = queries @ gallery.T
    aps = []
    for i in range(len(queries)):
        keep = np.arange(len(gallery)) != i if same else np.ones(len(gallery), dtype=bool)
        aps.append(average_precision(sim[i][keep], (g_cat == q_cat[i])[keep]))
    return float(np.mean(aps))


@torch.no_grad()
def layer_vectors(ref: str, paths: list[Path], domain: str) -> dict[str, np.ndarray]:
    """Each stage's L2-normalised vector of every image, through the checkpoint's torch model."""
    ckpt = load_checkpoint(ref)
    model = ckpt.build()
    assert isinstance(model, SketchPhotoEncoder) and ckpt.config.embed_dim, "a trained EfficientNet-Lite model"
    load = photo_input if domain == "photo" else sketch_input
    out: dict[str, list[torch.Tensor]] = {"pooled": [], "head input": [], "head": [], "embedding": []}
    for lo in range(0, len(paths), 32):
        x = torch.from_numpy(np.stack([load(p, ckpt.preprocessing, None) for p in paths[lo : lo + 32]]))
        model.trunk.set_domain(domain)
        feats = model.features(x, domain)
        head = model.head_for(domain)(feats)
        out["pooled"].append(feats[:, :POOLED_DIM])
        out["head input"].append(feats)
        out["head"].append(head)
        out["embedding"].append(model.join_pooled(model.finish(head), feats[:, :POOLED_DIM], domain))
    return {k: torch.nn.functional.normalize(torch.cat(v), dim=1).numpy() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--layers", action="store_true", help="each stage of a trained model, through torch")
    args = parser.parse_args()
    data = load_dataset(args.data / "sketchy100").subset(categories=set(HELD_OUT_CATEGORIES))
    p_cat = np.array([p.category for p in data.photos])
    s_cat = np.array([s.category for s in data.sketches])
    print(f"held-out 10: {len(data.sketches)} sketches, {len(data.photos)} photos; category mAP@all")
    print(f"{'model':<40} {'sketch->photo':>13} {'photo->photo':>13} {'sketch->sketch':>14}")
    for ref in args.models:
        if args.layers:
            p_layers = layer_vectors(ref, [p.path for p in data.photos], "photo")
            s_layers = layer_vectors(ref, [s.path for s in data.sketches], "sketch")
            for name, photos in p_layers.items():
                sketches = s_layers[name]
                print(
                    f"{Path(ref).name + ': ' + name:<40} {category_map(sketches, photos, s_cat, p_cat, False):>13.3f}"
                    f" {category_map(photos, photos, p_cat, p_cat, True):>13.3f}"
                    f" {category_map(sketches, sketches, s_cat, s_cat, True):>14.3f}"
                )
            continue
        embedder = Embedder(load_checkpoint(ref))
        photos = embed_gallery(embedder, data)
        sketches = embedder.embed_sketches([s.path for s in data.sketches])
        print(
            f"{embedder.model_id:<40} {category_map(sketches, photos, s_cat, p_cat, False):>13.3f}"
            f" {category_map(photos, photos, p_cat, p_cat, True):>13.3f}"
            f" {category_map(sketches, sketches, s_cat, s_cat, True):>14.3f}"
        )


if __name__ == "__main__":
    main()
