"""The inference runtime: a loaded model that embeds sketches and photos (ONNX Runtime on CPU, torch on CUDA)."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder.checkpoint import Checkpoint, load_checkpoint
from encoder.errors import ModelLoadError, SketchSearchError
from encoder.export import DOMAINS, EXPORT_VERSION, export_onnx
from encoder.preprocess import (
    ImageSource,
    load_sketch,
    prepare_photo,
    prepare_photo_file,
    prepare_sketch,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileFailure:
    path: Path
    reason: str


@dataclass
class PhotoBatchResult:
    """Embeddings of the photos that decoded, in input order, and the reasons the others failed."""

    paths: list[Path]
    vectors: np.ndarray
    sizes: list[tuple[int, int]]
    failures: list[FileFailure]


def _default_backend() -> str:
    return "torch" if torch.cuda.is_available() else "onnx"


class Embedder:
    """Embeds sketches and photos with one checkpoint; the preprocessing comes from the checkpoint."""

    def __init__(
        self,
        ckpt: Checkpoint,
        backend: str | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.prep = ckpt.preprocessing
        self.model_id = ckpt.model_id
        self.dim = ckpt.dim
        self.threshold = ckpt.threshold
        self.backend = backend or _default_backend()
        self.threads = threads or max(1, os.cpu_count() or 1)
        self._model = ckpt.build()
        self._device = torch.device(
            "cuda" if self.backend == "torch" and torch.cuda.is_available() else "cpu"
        )
        self._sessions: dict[str, object] = {}
        # the torch model picks the domain's BatchNorm statistics per call: one torch call at a time
        self._torch_lock = threading.Lock()
        if self.backend == "onnx":
            cache = cache_dir or Path(tempfile.gettempdir()) / "sketchsearch-onnx"
            for domain in DOMAINS:
                self._sessions[domain] = self._onnx_session(cache, domain)
        elif self.backend == "torch":
            self._model.to(self._device)
        else:
            raise SketchSearchError(f"unknown backend {self.backend!r}: use onnx or torch")

    def _onnx_session(self, cache: Path, domain: str) -> object:
        """The domain's cached graph (exported and checked first when missing); a cached file that ONNX Runtime
        cannot load (truncated by a crash, corrupted) is exported again once rather than trusted forever."""
        path = cache / f"{self.model_id}-{domain}-x{EXPORT_VERSION}.onnx"
        again = ""
        if path.is_file():
            try:
                return self._load_session(path)
            except Exception as exc:  # ONNX Runtime's load errors share no useful base class
                logger.warning("cached ONNX graph %s does not load (%s): exporting it again", path, exc)
                again = " even when exported again"
        # export_onnx has loaded and checked the graph against torch already: a failure to load it now is rare
        export_onnx(self._model, domain, self.prep.image_size, self.prep.channels, path)
        try:
            return self._load_session(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: the graph does not load{again} ({exc})") from exc

    def _load_session(self, path: Path) -> object:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed_arrays(self, batch: np.ndarray, domain: str) -> np.ndarray:
        """Prepared inputs (N, C, H, W) -> L2-normalised float32 embeddings (N, dim)."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "onnx":
            session = self._sessions[domain]
            out = session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]  # type: ignore[attr-defined]
            return np.asarray(out, dtype=np.float32)
        with self._torch_lock, torch.no_grad(), torch.autocast("cuda", enabled=self._device.type == "cuda"):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._device)
            out = self._model.embed(x, domain)  # type: ignore[operator]
        return out.float().cpu().numpy()

    def _embed_all(
        self, arrays: Iterator[np.ndarray] | list[np.ndarray], domain: str, batch_size: int
    ) -> np.ndarray:
        chunks, pending = [], []
        for arr in arrays:
            pending.append(arr)
            if len(pending) == batch_size:
                chunks.append(self.embed_arrays(np.stack(pending), domain))
                pending = []
        if pending:
            chunks.append(self.embed_arrays(np.stack(pending), domain))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    def embed_photos(self, photos: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Decoded photos -> embeddings."""
        return self._embed_all((prepare_photo(p, self.prep) for p in photos), "photo", batch_size)

    def embed_sketches(self, sketches: Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Sketches (decoded or files) -> embeddings; EmptySketchError or InvalidImageError on bad input, naming
        the file when the sketch is one."""
        arrays = [prepare_sketch(load_sketch(s, self.prep), self.prep) for s in sketches]
        vectors = self._embed_all(arrays, "sketch", batch_size)
        if self.prep.sketch_flip and len(arrays):
            mirrored = self._embed_all([a[:, :, ::-1].copy() for a in arrays], "sketch", batch_size)
            summed = vectors + mirrored
            vectors = summed / np.linalg.norm(summed, axis=1, keepdims=True).clip(1e-12)
        return vectors

    def embed_sketch(self, sketch: ImageSource) -> np.ndarray:
        return self.embed_sketches([sketch])[0]

    def embed_photo_files(
        self,
        paths: Sequence[Path],
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> PhotoBatchResult:
        """Decode (in threads) and embed photo files; a bad file is reported, never fatal."""

        def decode(path: Path) -> tuple[np.ndarray, tuple[int, int]] | FileFailure:
            try:  # scaled here, in the decoding threads: the model's thread only stacks the batch
                return prepare_photo_file(path, self.prep)
            except SketchSearchError as exc:
                return FileFailure(path, str(exc))
            except Exception as exc:  # a decoder bug on one file must not stop a gallery ingest
                return FileFailure(path, f"{path}: {type(exc).__name__}: {exc}")  # named, as ours are

        ok_paths: list[Path] = []
        sizes: list[tuple[int, int]] = []
        failures: list[FileFailure] = []
        vectors: list[np.ndarray] = []
        with ThreadPoolExecutor(max_workers=min(4, self.threads)) as pool:
            # decode ahead of the model, but at most two batches ahead: a large folder must not fill memory
            queue: deque[Future[tuple[np.ndarray, tuple[int, int]] | FileFailure]] = deque()
            upcoming = iter(paths)

            def decoded() -> Iterator[tuple[np.ndarray, tuple[int, int]] | FileFailure]:
                for path in islice(upcoming, 2 * batch_size):
                    queue.append(pool.submit(decode, path))
                while queue:
                    item = queue.popleft().result()
                    for path in islice(upcoming, 1):
                        queue.append(pool.submit(decode, path))
                    yield item

            pending: list[np.ndarray] = []

            def flush() -> None:
                if pending:
                    vectors.append(self.embed_arrays(np.stack(pending), "photo"))
                    if on_batch:
                        on_batch(len(pending))
                    pending.clear()

            for path, item in zip(paths, decoded(), strict=True):
                if isinstance(item, FileFailure):
                    failures.append(item)
                    continue
                pending.append(item[0])
                ok_paths.append(path)
                sizes.append(item[1])
                if len(pending) == batch_size:
                    flush()
            flush()
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)
        return PhotoBatchResult(ok_paths, matrix, sizes, failures)


def load_embedder(
    ref: str | Path | None = None,
    backend: str | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> Embedder:
    """Load a model by reference (None/'default', a shipped name or a checkpoint path)."""
    return Embedder(load_checkpoint(ref), backend=backend, cache_dir=cache_dir, threads=threads)
