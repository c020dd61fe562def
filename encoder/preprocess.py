"""Image decoding and preprocessing for sketches and photos, stored with each model so it cannot drift."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder.errors import EmptySketchError, InvalidImageError

logger = logging.getLogger(__name__)

ImageSource = str | Path | bytes | BinaryIO | Image.Image

# PIL's own bomb check only fires at twice its limit and only warns below that; we enforce ours explicitly.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded image into a model input; saved in every checkpoint."""

    image_size: int = 224
    channels: int = 3  # 3: RGB photos, sketches replicated to 3 channels; 1: grayscale (the seed model)
    mean: float = 127.0  # EfficientNet-Lite was trained on (x - 127) / 128
    std: float = 128.0
    sketch_margin: float = 0.06  # margin around the ink's bounding box, as a fraction of its longer side
    ink_level: int = 48  # a pixel counts as ink when it is this much darker than white
    max_pixels: int = 64_000_000
    sketch_flip: bool = False  # embed a sketch and its mirror image and average: drawings face either way

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> Preprocessing:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    name = str(source) if isinstance(source, str | Path) else "<bytes>"
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source))
        return Image.open(source)
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{name}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidImageError(f"{name}: is a directory, not an image") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"{name}: not a readable image ({exc})") from exc


def _decode(source: ImageSource, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Open, bound-check and fully decode an image so that truncation is found here, not later."""
    image = _open(source)
    name = getattr(image, "filename", "") or (str(source) if isinstance(source, str | Path) else "<bytes>")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    try:
        if draft_size and image.format == "JPEG":
            # JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 size directly: several times faster.
            image.draft("RGB", (draft_size, draft_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
        orientation = image.getexif().get(0x0112, 1)
        image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    # the draft decode may be smaller than the file: keep the photo's own size (as displayed) for the caller
    image.info["original_size"] = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return image


def original_size(image: Image.Image) -> tuple[int, int]:
    """The decoded file's own width and height, before any draft reduction, EXIF orientation applied."""
    size = image.info.get("original_size")
    return tuple(size) if size else image.size  # type: ignore[return-value]


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite any transparency over white: a transparent background means paper."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image


def load_photo(source: ImageSource, prep: Preprocessing | None = None) -> Image.Image:
    """Decode a photo (EXIF orientation applied, fast JPEG draft) into an RGB image; InvalidImageError if bad."""
    prep = prep or Preprocessing()
    image = _decode(source, prep.max_pixels, draft_size=prep.image_size)
    image = _flatten_alpha(image)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_sketch(source: ImageSource, prep: Preprocessing | None = None) -> Image.Image:
    """Decode a sketch into grayscale, black ink on white, whatever its mode or polarity."""
    prep = prep or Preprocessing()
    image = _flatten_alpha(_decode(source, prep.max_pixels))
    gray = image.convert("L")
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if float(np.median(border)) < 128:  # white strokes on a dark background: invert
        gray = ImageOps.invert(gray)
    return gray


def crop_sketch(sketch: Image.Image, prep: Preprocessing) -> Image.Image:
    """Crop a black-on-white sketch to its ink with a margin and pad it to a white square."""
    pixels = np.asarray(sketch.convert("L"))
    ink = pixels < (255 - prep.ink_level)
    if int(ink.sum()) < 4:
        raise EmptySketchError("the sketch is empty: no strokes were found")
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = int(round(side * (1 + 2 * prep.sketch_margin))) + 2
    cy, cx = (top + bottom) / 2, (left + right) / 2
    box = (int(round(cx - side / 2)), int(round(cy - side / 2)))
    canvas = Image.new("L", (side, side), 255)
    canvas.paste(sketch.convert("L").crop((box[0], box[1], box[0] + side, box[1] + side)), (0, 0))
    # crop() outside the image fills black; repaint those parts white
    out = np.asarray(canvas).copy()
    x0, y0 = box
    if x0 < 0:
        out[:, :-x0] = 255
    if y0 < 0:
        out[:-y0, :] = 255
    if x0 + side > sketch.width:
        out[:, sketch.width - x0 :] = 255
    if y0 + side > sketch.height:
        out[sketch.height - y0 :, :] = 255
    return Image.fromarray(out, mode="L")


def _scale_table(mean: float, std: float) -> np.ndarray:
    return (np.arange(256, dtype=np.float32) - np.float32(mean)) / np.float32(std)


def _normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """HWC or HW uint8 -> CHW float32, scaled as the model expects."""
    if pixels.dtype == np.uint8:
        # a 256-entry lookup gives the same float32 values as (x - mean) / std, about 3x faster: decode and
        # scaling share the CPU with the model during bulk ingestion
        arr = _scale_table(prep.mean, prep.std)[pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]]
        if prep.channels == 3 and arr.shape[0] == 1:
            return np.repeat(arr, 3, axis=0)
        if prep.channels == 1 and arr.shape[0] == 3:
            return _normalise(pixels.astype(np.float32), prep)
        return arr
    arr = pixels.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    if prep.channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif prep.channels == 1 and arr.shape[0] == 3:
        arr = (0.299 * arr[0] + 0.587 * arr[1] + 0.114 * arr[2])[None]
    return (arr - prep.mean) / prep.std


def resize_photo(photo: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop a square."""
    w, h = photo.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = photo.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return resized.crop((left, top, left + size, top + size))


def prepare_photo(photo: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded photo -> normalised CHW float32 model input."""
    return _normalise(np.asarray(resize_photo(photo, prep.image_size)), prep)


def prepare_sketch(sketch: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded sketch -> ink crop, white square, normalised CHW float32 model input."""
    square = crop_sketch(sketch, prep)
    resized = square.resize((prep.image_size, prep.image_size), Image.Resampling.LANCZOS)
    return _normalise(np.asarray(resized), prep)
