"""ONNX export of a model's sketch and photo branches, checked against torch before it is trusted."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoder.errors import ModelLoadError
from encoder.model import DomainEncoder

logger = logging.getLogger(__name__)

DOMAINS = ("photo", "sketch")
# bumped whenever the exported graph changes for the same weights, so that cached exports are redone
EXPORT_VERSION = 3
# the agreement the project requires between an exported graph and torch (tests/encoder/test_export.py)
TOLERANCE = 1e-4
CHECK_BATCH = 2  # inputs compared at export time: a fraction of a second once torch is warm
# torch.onnx.export keeps global tracing state, and the traced model's domain is switched on the model itself:
# one export (and its check) at a time in a process
_EXPORT_LOCK = threading.Lock()


def export_onnx(model: nn.Module, domain: str, image_size: int, channels: int, path: Path) -> Path:
    """Export one domain's branch (image batch -> embeddings) with a dynamic batch axis, check it against torch on
    a small random batch, then move it into place; ModelLoadError when the export fails or disagrees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of this process and thread in the same folder: concurrent exporters never write into each other's
    # file, and the final rename within one file system is atomic, so readers see a whole graph or none
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    graph = DomainEncoder(model, domain).eval()
    example = torch.zeros(2, channels, image_size, image_size)
    inputs = np.random.default_rng(0).uniform(-1, 1, (CHECK_BATCH, channels, image_size, image_size))
    try:
        with _EXPORT_LOCK:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        graph,
                        (example,),
                        str(tmp),
                        input_names=["image"],
                        output_names=["embedding"],
                        dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
                        opset_version=17,
                        dynamo=False,
                    )
                difference = max_onnx_torch_difference(model, domain, tmp, inputs.astype(np.float32))
            except Exception as exc:  # a model that does not trace, export or run cannot be served
                raise ModelLoadError(f"{path}: the ONNX export of the {domain} branch failed ({exc})") from exc
        if not difference <= TOLERANCE:  # written so that NaN fails too
            raise ModelLoadError(
                f"{path}: the exported {domain} branch differs from torch by {difference:.2e} (limit {TOLERANCE:g})"
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when something failed: the checked graph was renamed away
    logger.info("exported %s branch to %s", domain, path)
    return path


def max_onnx_torch_difference(model: nn.Module, domain: str, onnx_path: Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between the ONNX Runtime and torch embeddings of the same inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": inputs.astype(np.float32)})[0]
    with torch.no_grad():
        want = DomainEncoder(model, domain).eval()(torch.from_numpy(inputs.astype(np.float32))).numpy()
    return float(np.abs(got - want).max())
