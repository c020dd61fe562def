"""ONNX export of a model's sketch and photo branches, checked against torch before it is trusted."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoder.model import DomainEncoder

logger = logging.getLogger(__name__)

DOMAINS = ("photo", "sketch")
# bumped whenever the exported graph changes for the same weights, so that cached exports are redone
EXPORT_VERSION = 3


def export_onnx(model: nn.Module, domain: str, image_size: int, channels: int, path: Path) -> Path:
    """Export one domain's branch (image batch -> embeddings) with a dynamic batch axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = DomainEncoder(model, domain).eval()
    example = torch.zeros(2, channels, image_size, image_size)
    tmp = path.with_suffix(".tmp.onnx")
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
    tmp.replace(path)
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
