"""The exported photo graph in other runtimes and forms: ONNX Runtime with a dynamic or a fixed batch axis, OpenVINO.

.venv/bin/python bench/bench_runtime.py [--model default] [--rounds 8]

Model only (random inputs, no decoding), batch 32, two threads, the runtimes alternating call by call in one
process so that a machine whose speed drifts treats them alike. OpenVINO is measured only where it is installed
(`.venv/bin/pip install openvino`; it is not a dependency of the project).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.export import export_onnx

BATCH = 32
THREADS = 2


def _ort(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run(None, {"image": x})[0])


def _openvino(path: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    try:
        import openvino as ov  # type: ignore[import-not-found]
    except ImportError:
        return None
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    return lambda x: np.asarray(request.infer({0: x})[0])


def _fixed_batch(path: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(path))
    make_dim_param_fixed(model.graph, "batch", BATCH)
    onnx.save(model, str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    ckpt = load_checkpoint(None if args.model == "default" else args.model)
    prep = ckpt.preprocessing
    x = np.random.default_rng(0).standard_normal((BATCH, prep.channels, prep.image_size, prep.image_size))
    x = x.astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        dynamic = export_onnx(ckpt.build(), "photo", prep.image_size, prep.channels, Path(work) / "photo.onnx")
        runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "onnx runtime, dynamic batch axis (as shipped)": _ort(dynamic),
            "onnx runtime, batch fixed at 32": _ort(_fixed_batch(dynamic, Path(work) / "fixed.onnx")),
        }
        openvino = _openvino(dynamic)
        if openvino is not None:
            runs["openvino, latency hint, f32"] = openvino
        reference = runs["onnx runtime, dynamic batch axis (as shipped)"](x)
        for run in runs.values():  # warm up, and the same answers before timing anything
            for _ in range(2):
                out = run(x)
            assert np.abs(out - reference).max() < 1e-4
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run(x)
                seconds[name].append(time.perf_counter() - t0)
    print(f"# {ckpt.model_id}, {prep.image_size} px, batch {BATCH}, {THREADS} threads, {args.rounds} rounds,"
          " model only")
    if openvino is None:
        print("# openvino: not installed, not measured")
    print(f"\n{'runtime':<48} {'photos/s (median)':>18} {'best':>8}")
    for name, times in seconds.items():
        print(f"{name:<48} {BATCH / statistics.median(times):>18.1f} {BATCH / min(times):>8.1f}")


if __name__ == "__main__":
    main()
