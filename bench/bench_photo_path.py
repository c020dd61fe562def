"""Ways to prepare and run the bulk photo path, alternating round by round in one process: end-to-end photos/s.

    .venv/bin/python bench/bench_photo_path.py [--model default] [--photos 512] [--rounds 12] [--session-options]

The photo arrangements change only how `Embedder.embed_photo_files` prepares each photo (the inputs are the same
bit for bit): `current` (prepare_photo_file in the decoding threads), `copy+table` (the path before it: load_photo,
whose upright photos are copied whole, a crop that copies a square photo again, and a table lookup) and
`batch-in-model-thread` (uint8 pixels from the threads, stacked and scaled per batch in the model's thread). With
--session-options, ONNX Runtime session settings on the current arrangement instead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

import encoder.embedder as embedder_module
from encoder.embedder import Embedder, load_embedder
from encoder.export import EXPORT_VERSION
from encoder.preprocess import (
    Preprocessing,
    load_photo,
    load_photo_pixels,
    normalise_batch,
    original_size,
    prepare_photo_file,
    resize_photo,
)

Prepared = tuple[np.ndarray, tuple[int, int]]


def copy_and_table(path: Path, prep: Preprocessing) -> Prepared:
    """The path before the twenty-first session: load_photo's full-size copy, a crop even of a square photo (which
    only copied it), then prepare_photo's table lookup."""
    photo = load_photo(path, prep)
    resized = resize_photo(photo, prep.image_size)
    if photo.width == photo.height:
        resized = resized.crop((0, 0, prep.image_size, prep.image_size))
    table = (np.arange(256, dtype=np.float32) - np.float32(prep.mean)) / np.float32(prep.std)
    return table[np.asarray(resized).transpose(2, 0, 1)], original_size(photo)


# name -> (what each decoding thread returns, whether the model's thread scales the stacked uint8 batch)
ARRANGEMENTS: dict[str, tuple[Callable[[Path, Preprocessing], Prepared], bool]] = {
    "current": (prepare_photo_file, False),
    "copy+table": (copy_and_table, False),
    "batch-in-model-thread": (load_photo_pixels, True),
}
CACHE = Path(tempfile.gettempdir()) / "sketchsearch-onnx"  # the embedder's default graph cache


def session_variants(emb: Embedder) -> dict[str, object]:
    import onnxruntime as ort

    graph = CACHE / f"{emb.model_id}-photo-x{EXPORT_VERSION}.onnx"
    settings: dict[str, dict[str, str]] = {
        "default": {},
        "dynamic_block_base 4": {"session.dynamic_block_base": "4"},
        "denormal as zero": {"session.set_denormal_as_zero": "1"},
        "no spinning": {"session.intra_op.allow_spinning": "0"},
    }
    sessions = {}
    for name, entries in settings.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = emb.threads
        options.inter_op_num_threads = 1
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        sessions[name] = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--session-options", action="store_true")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sketchy100",
    )
    args = parser.parse_args()
    paths = sorted((args.data / "photo").glob("*/*.jpg"))[: args.photos]
    if not paths:
        raise SystemExit(f"no photos under {args.data}/photo")
    emb = load_embedder(None if args.model == "default" else args.model, backend="onnx", cache_dir=CACHE)
    reference = emb.embed_photo_files(paths[:64]).vectors  # also the warm-up
    embed_arrays = emb.embed_arrays

    def scaled_then_embedded(batch: np.ndarray, domain: str) -> np.ndarray:
        return embed_arrays(normalise_batch(batch, emb.prep), domain)

    def use_arrangement(name: str) -> None:
        decode, scale_in_model_thread = ARRANGEMENTS[name]
        embedder_module.prepare_photo_file = decode  # type: ignore[assignment]
        emb.embed_arrays = scaled_then_embedded if scale_in_model_thread else embed_arrays  # type: ignore[method-assign]

    def use_session(session: object) -> None:
        emb._sessions["photo"] = session

    if args.session_options:
        setups: dict[str, Callable[[], None]] = {
            name: partial(use_session, session) for name, session in session_variants(emb).items()
        }
    else:
        setups = {name: partial(use_arrangement, name) for name in ARRANGEMENTS}
    results: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            setup()
            t0 = time.perf_counter()
            result = emb.embed_photo_files(paths)
            results[name].append(len(paths) / (time.perf_counter() - t0))
            # every arrangement must embed the same photos the same way
            assert np.allclose(result.vectors[:64], reference, atol=1e-5), name
    use_arrangement("current")
    print(f"# model {emb.model_id}, {len(paths)} photos, batch 32, {args.rounds} rounds alternating")
    print(f"\n{'arrangement' if not args.session_options else 'session setting':<26} {'median':>8}  runs (photos/s)")
    for name, values in results.items():
        print(f"{name:<26} {np.median(values):>8.1f}  {' '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
