"""Static int8 quantisation of a model's ONNX photo branch: photos/s (model only) and retrieval, fp32 beside int8.

    .venv/bin/python bench/bench_quantize.py MODEL [--calibration 96] [--data ../shared/data]

The photo branch is what a gallery ingest runs for every photo. It is quantised with ONNX Runtime's static QDQ
scheme (int8 weights per channel, uint8 activations), calibrated on photos of the training categories only. The
sketches keep the fp32 sketch branch, so the retrieval columns show what the int8 gallery costs in quality.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from encoder.checkpoint import load_checkpoint
from encoder.data import HELD_OUT_CATEGORIES, load_dataset
from encoder.embedder import Embedder
from encoder.export import export_onnx
from encoder.metrics import retrieval_metrics
from encoder.preprocess import Preprocessing, load_photo, prepare_photo


def _arrays(paths: list[Path], prep: Preprocessing) -> np.ndarray:
    return np.stack([prepare_photo(load_photo(p, prep), prep) for p in paths]).astype(np.float32)


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration", type=int, default=96, help="training-category photos to calibrate on")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.model)  # "default" names the shipped model
    embedder = Embedder(ckpt)  # the sketches' fp32 branch
    work = Path(tempfile.mkdtemp())
    prep = ckpt.preprocessing
    fp32 = export_onnx(ckpt.build(), "photo", prep.image_size, prep.channels, work / "photo-fp32.onnx")
    sketchy = load_dataset(args.data / "sketchy100")
    held = set(HELD_OUT_CATEGORIES)
    seen = [p.path for p in sketchy.subset(exclude=held).photos]
    calibration = _arrays(seen[:: max(1, len(seen) // args.calibration)][: args.calibration], prep)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    int8 = work / "photo-int8.onnx"
    quantize_static(
        str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    timing = _arrays([p.path for p in sketchy.photos[:256]], prep)

    def embed(name: str, photos: np.ndarray) -> np.ndarray:
        session = sessions[name]
        out = np.concatenate([session.run(None, {"image": photos[i : i + 32]})[0] for i in range(0, len(photos), 32)])
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)

    suites = [
        ("held-out 10", sketchy.subset(categories=held)),
        ("qmul-shoes/test", load_dataset(args.data / "qmul-shoes" / "test")),
    ]
    queries = [embedder.embed_sketches([s.path for s in data.sketches]) for _, data in suites]
    galleries = [_arrays([p.path for p in data.photos], prep) for _, data in suites]
    print(f"{ckpt.model_id}: calibrated on {len(calibration)} photos of the training categories")
    print(f"{'photo branch':<13} {'photos/s':>9} {'held-out acc@1':>15} {'acc@10':>7} {'mAP@all':>8}", end="")
    print(f" {'shoes acc@1':>12} {'acc@10':>7}")
    for name in sessions:
        embed(name, timing[:32])  # warm-up
        t0 = time.perf_counter()
        embed(name, timing)
        rate = len(timing) / (time.perf_counter() - t0)
        cells = []
        for (_, data), sketches, photos in zip(suites, queries, galleries, strict=True):
            m = retrieval_metrics(sketches, embed(name, photos), data)
            cells += [m.instance.acc[1], m.instance.acc[10]]
            cells += [m.category.map_all] if m.category else []
        quality = f"{cells[0]:>15.3f} {cells[1]:>7.3f} {cells[2]:>8.3f} {cells[3]:>12.3f} {cells[4]:>7.3f}"
        print(f"{name:<13} {rate:>9.1f} {quality}")


if __name__ == "__main__":
    main()
