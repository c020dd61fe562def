"""The pooled join: the trunk's centred pooled vector joined to the embedding, over weights and projections.

    .venv/bin/python bench/bench_pooled_join.py MODEL [--weights 0.25,0.5,0.75,1] [--dims 0,256,128] \\
        [--data ../shared/data]

MODEL is a checkpoint trained without the held-out categories; a joined one is measured without its join and
joined afresh. The means and principal directions are fitted on the other 90 categories of sketchy100, as
`train --pooled-weight` and `join-pooled` fit them on the training data: every photo and every sketch that has
its photo. Prints held-out and qmul-shoes/test acc@1 / acc@10 / mAP@all for the plain embedding and each joined
variant. The join is the model's own (`join_pooled` on the same vectors), so the numbers are what `eval` gives
for a model joined with those settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, SketchyDataset, load_dataset
from encoder.metrics import retrieval_metrics
from encoder.model import POOLED_DIM, SketchPhotoEncoder
from encoder.preprocess import Preprocessing
from encoder.train import photo_input, pooled_vectors, sketch_input
from encoder.whitening import fit_pooled_join


@torch.no_grad()
def embed_both(
    model: SketchPhotoEncoder, prep: Preprocessing, paths: list[Path], domain: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's embedding, the trunk's pooled vector) of each image, from one forward pass."""
    load = photo_input if domain == "photo" else sketch_input
    out_z, out_p = [], []
    for lo in range(0, len(paths), 32):
        x = torch.from_numpy(np.stack([load(p, prep, None) for p in paths[lo : lo + 32]]))
        model.trunk.set_domain(domain)
        feats = model.features(x, domain)
        out_z.append(model.finish(model.head_for(domain)(feats)))
        out_p.append(feats[:, :POOLED_DIM])
    return torch.cat(out_z), torch.cat(out_p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", default="0.25,0.5,0.75,1")
    parser.add_argument("--dims", default="0,256,128")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.model)
    if ckpt.config.pooled_weight > 0:
        print(f"{ckpt.model_id} joins the pooled vector: measured without the join, then joined afresh")
        ckpt = ckpt.without_pooled_join()
    model = ckpt.build()
    assert isinstance(model, SketchPhotoEncoder), "an EfficientNet-Lite model"
    prep = ckpt.preprocessing
    full = load_dataset(args.data / "sketchy100")
    fit = full.subset(exclude=set(HELD_OUT_CATEGORIES))
    paired = sorted({s for s, _ in fit.instance_pairs()})
    fit_sketches = pooled_vectors(model, prep, [fit.sketches[i].path for i in paired], "sketch")
    fit_photos = pooled_vectors(model, prep, [p.path for p in fit.photos], "photo")
    print(f"fitted on {len(fit_sketches)} sketches and {len(fit_photos)} photos of {len(fit.categories)} "
          f"categories; {ckpt.model_id}")
    suites: list[tuple[str, SketchyDataset]] = [
        ("held-out 10", full.subset(categories=set(HELD_OUT_CATEGORIES))),
        ("qmul-shoes/test", load_dataset(args.data / "qmul-shoes" / "test")),
    ]
    vectors = {
        name: (embed_both(model, prep, [s.path for s in d.sketches], "sketch"),
               embed_both(model, prep, [p.path for p in d.photos], "photo"))
        for name, d in suites
    }
    print(f"{'join':<22}" + "".join(f" {name + ' acc@1 / acc@10 / mAP':>36}" for name, _ in suites))
    configs = [(0.0, 0)] + [(float(w), int(d)) for d in args.dims.split(",") for w in args.weights.split(",")]
    for weight, dims in configs:
        cells = []
        joined = ckpt.build()
        assert isinstance(joined, SketchPhotoEncoder)
        if weight:
            photo_mean, sketch_mean, basis = fit_pooled_join(fit_sketches, fit_photos, dims)
            joined.set_pooled_join(torch.from_numpy(photo_mean), torch.from_numpy(sketch_mean),
                                   None if basis is None else torch.from_numpy(basis), weight)
        for name, data in suites:
            (sz, sp), (pz, pp) = vectors[name]
            sz, pz = joined.join_pooled(sz, sp, "sketch"), joined.join_pooled(pz, pp, "photo")  # as is at weight 0
            r = retrieval_metrics(sz.numpy(), pz.numpy(), data)
            cells.append(f"{r.instance.acc[1]:.3f} / {r.instance.acc[10]:.3f} / "
                         + (f"{r.category.map_all:.3f}" if r.category else "  n/a"))
        label = "none (the embedding)" if not weight else f"weight {weight:g}, dims {dims or 'all'}"
        print(f"{label:<22}" + "".join(f" {c:>36}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
