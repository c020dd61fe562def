"""Where a model's exported photo graph spends its time in ONNX Runtime: threads, sub-batches, operator profile.

.venv/bin/python bench/bench_photo_graph.py [--model default] [--rounds 6] [--split 2,4]

Model only (random inputs, no decoding), batch 32, to see whether the graph itself can run faster on this CPU.
--split K runs the graph in two parts, the stem and blocks 0..K-1 (the 96 and 48 px layers, whose activations
of 32 photos outgrow the L3 cache) in sub-batches of 1 and 4, the rest at 32: does the front gain from staying
in cache more than the split costs?
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoder.checkpoint import load_checkpoint
from encoder.export import export_onnx
from encoder.model import POOLED_DIM, SketchPhotoEncoder

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


class _Front(nn.Module):
    """Image -> the output of block k-1 (photo statistics)."""

    def __init__(self, model: SketchPhotoEncoder, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.model.trunk_for("photo")  # the trunk features_from continues in
        h = trunk.stem(x)
        for block in trunk._blocks[: self.k]:
            h = block(h)
        return h


class _Back(nn.Module):
    """The output of block k-1 -> the photo embedding, as the whole graph computes it."""

    def __init__(self, model: SketchPhotoEncoder, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        feats = self.model.features_from(h, self.k, [], "photo")
        z = self.model.finish(self.model.photo_head(feats))
        return self.model.join_pooled(z, feats[:, :POOLED_DIM], "photo")


def _export_part(part: nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(
        part.eval(), (example,), str(path), input_names=["image"], output_names=["out"],
        dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    return path


def _split_arms(
    ckpt_model: SketchPhotoEncoder, ks: list[int], x: np.ndarray, whole: np.ndarray, work: Path
) -> dict[int, tuple[object, object]]:
    """For each k: (front session, back session), checked to give the whole graph's embeddings."""
    model = ckpt_model.eval()
    model.trunk.set_domain("photo")
    for param in model.parameters():
        param.requires_grad_(False)  # traced weights must be constants
    last = min(model.cfg.mid_blocks, default=len(model.trunk._blocks) - 1)
    if any(not 1 <= k <= last for k in ks):
        raise SystemExit(f"--split: each k must be 1 to {last} (the first tapped block)")
    parts = {}
    for k in ks:
        example = torch.zeros(2, *x.shape[1:])
        with torch.no_grad():
            inner = _Front(model, k)(example)
        front = _session(_export_part(_Front(model, k), example, work / f"front{k}.onnx"), 2)
        back = _session(_export_part(_Back(model, k), inner, work / f"back{k}.onnx"), 2)
        got = back.run(None, {"image": front.run(None, {"image": x})[0]})[0]  # type: ignore[attr-defined]
        difference = float(np.abs(got - whole).max())
        print(f"# split after block {k - 1}: {tuple(inner.shape[1:])} between the parts, "
              f"max difference from the whole graph {difference:.1e}")
        if not difference <= 1e-4:  # the project's ONNX/torch tolerance: a split that computes otherwise is no arm
            raise SystemExit(f"--split {k}: the two parts differ from the whole graph by {difference:.1e}")
        parts[k] = (front, back)
    return parts


def _split_rate(front: object, back: object, x: np.ndarray, sub: int, passes: int = 2) -> float:
    t0 = time.perf_counter()
    for _ in range(passes):
        inner = [front.run(None, {"image": x[i : i + sub]})[0] for i in range(0, len(x), sub)]  # type: ignore[attr-defined]
        back.run(None, {"image": np.concatenate(inner)})  # type: ignore[attr-defined]
    return passes * len(x) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--split", default="", help="comma-separated k: also run the graph split after block k-1")
    args = parser.parse_args()
    ckpt = load_checkpoint(None if args.model == "default" else args.model)
    prep = ckpt.preprocessing
    work = Path(tempfile.mkdtemp())
    model = ckpt.build()
    path = export_onnx(model, "photo", prep.image_size, prep.channels, work / "photo.onnx")
    x = np.random.default_rng(0).standard_normal((BATCH, prep.channels, prep.image_size, prep.image_size))
    x = x.astype(np.float32)
    print(f"# {ckpt.model_id}, {prep.image_size} px, batch {BATCH}, {args.rounds} rounds, model only")

    # sub-batches: the same 32 inputs as 1, 4 or 8 calls, alternating round by round
    two = _session(path, 2)
    arms: dict[str, Callable[[], float]] = {
        f"2 threads, {BATCH // sub} call(s) of {sub}": partial(_rate, two, x, sub) for sub in (32, 8, 4)
    }
    if args.split:
        assert isinstance(model, SketchPhotoEncoder), "--split needs an EfficientNet-Lite model"
        whole = two.run(None, {"image": x})[0]  # type: ignore[attr-defined]
        parts = _split_arms(model, [int(k) for k in args.split.split(",")], x, whole, work)
        for k, (front, back) in parts.items():
            for sub in (1, 4):
                arms[f"split after block {k - 1}, front {BATCH // sub} x {sub}"] = partial(
                    _split_rate, front, back, x, sub
                )
    for run in arms.values():
        run()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, run in arms.items():
            rates[name].append(run())
    print(f"\n{'how':<45} {'photos/s (median)':>18}")
    for name, values in rates.items():
        print(f"{name:<45} {statistics.median(values):>18.1f}")

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
