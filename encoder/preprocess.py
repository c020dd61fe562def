"""Image decoding and preprocessing for sketches and photos, stored with each model so it cannot drift."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder.errors import EmptySketchError, InvalidImageError

logger = logging.getLogger(__name__)

ImageSource = str | Path | bytes | BinaryIO | Image.Image

# Our own pixel limit (Preprocessing.max_pixels) is checked from the header before any decoding. PIL's global limit
# (Image.MAX_IMAGE_PIXELS, about 89M pixels) is left as it is, because it protects every other Image.open in the
# process. PIL only warns (DecompressionBombWarning) between that limit and twice it, and raises
# DecompressionBombError only above twice it (about 179M). Our loaders silence the warning because our own check
# decides, so an image under max_pixels opens quietly. With a max_pixels above twice PIL's limit, a file larger than
# twice PIL's limit is still refused, by PIL's error (an InvalidImageError here).
DEFAULT_MAX_PIXELS = 64_000_000

# A photo is embedded through a centre square crop: beyond 100:1 that crop shows under 1% of the photo, so such a
# file is a strip, a banner or a broken header, not a photo to search; real panoramas stay well below (about 12:1).
# Every photo within this bound is resized whole, then cropped, which is the arithmetic the models were trained with.
# At 100:1 the resized photo is 100 crops long (15 MB at 224 px).
MAX_PHOTO_ASPECT = 100.0

# An ink crop is padded to a white square at full resolution, exactly as always, whenever the square holds at most
# 4 x prep.max_pixels pixels (full_square_limit: 16,000 px and 256 MB at the default limit, and never less than
# MAX_SKETCH_SQUARE). That covers every sketch whose longer side is under about 14,000 px, so every image within the
# pixel limit up to about 3:1 between its sides. A larger square only comes from a long stroke across a long strip:
# it is scaled down to SCALED_SKETCH_SQUARE before padding, so that memory does not follow the stroke's length.
# That side is over 9 times the model's input, so the extra step costs a few levels in edge pixels.
MAX_SKETCH_SQUARE = 8192
SCALED_SKETCH_SQUARE = 2048

# 16-bit integer modes PIL opens (PNG and TIFF): convert("L"/"RGB") clips them at 255 instead of rescaling.
_MODES_16BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded image into a model input; saved in every checkpoint."""

    image_size: int = 224
    channels: int = 3  # 3: RGB photos, sketches replicated to 3 channels; 1: grayscale (the seed model)
    mean: float = 127.0  # EfficientNet-Lite was trained on (x - 127) / 128
    std: float = 128.0
    sketch_margin: float = 0.06  # margin around the ink's bounding box, as a fraction of its longer side
    ink_level: int = 48  # a pixel counts as ink when it is this much darker than white
    max_pixels: int = DEFAULT_MAX_PIXELS
    sketch_flip: bool = False  # embed a sketch and its mirror image and average: drawings face either way

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> Preprocessing:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


def _source_name(source: ImageSource) -> str:
    name = getattr(source, "filename", "") if isinstance(source, Image.Image) else ""
    return name or (str(source) if isinstance(source, str | Path) else "<bytes>")


def _open(source: str | Path | bytes | BinaryIO) -> Image.Image:
    name = _source_name(source)
    try:
        with warnings.catch_warnings():
            # PIL warns from the header alone between its limit and twice it: our own limit, checked next, decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{name}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidImageError(f"{name}: is a directory, not an image") from exc
    except Image.DecompressionBombError as exc:
        # PIL's own limit, from the header alone: it only fires for a max_pixels above twice PIL's limit
        raise InvalidImageError(f"{name}: too many pixels, exceeds the limit of PIL's bomb check ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # PIL names the file inside its own message too ("cannot identify image file '<path>'"): once is enough
        detail = str(exc).replace(f" '{name}'", "")
        raise InvalidImageError(f"{name}: not a readable image ({detail})") from exc


def _check_size(image: Image.Image, name: str, max_pixels: int, max_aspect: float | None = None) -> None:
    """InvalidImageError for an empty, too large or (given max_aspect) too elongated image, from its header."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    if max_aspect is not None and _too_elongated(width, height, max_aspect):
        raise InvalidImageError(
            f"{name}: {width}x{height} is too elongated for a photo (over {max_aspect:g}:1 between its sides)"
        )


def _too_elongated(width: int, height: int, max_aspect: float) -> bool:
    return max(width, height) > max_aspect * min(width, height)


@contextmanager
def open_image(
    source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float | None = None
) -> Iterator[Image.Image]:
    """Open an image lazily once its header passes the pixel limit; its file is closed on leaving, error or not.

    The one way encoder code opens image files: InvalidImageError if missing, unreadable or too large."""
    image = _open(source)
    # Image.__exit__ closes only a file PIL opened itself (a path), never a stream the caller passed in
    with image:
        _check_size(image, _source_name(source), max_pixels, max_aspect)
        yield image


def _decode(
    source: ImageSource, max_pixels: int, draft_size: int | None = None, max_aspect: float | None = None
) -> Image.Image:
    """Open, bound-check and fully decode an image so that truncation is found here, not later.

    The result is an in-memory copy: no file stays open behind it, not even for a multi-frame GIF or TIFF."""
    if isinstance(source, Image.Image):
        _check_size(source, _source_name(source), max_pixels, max_aspect)
        return _decoded(source, _source_name(source), draft_size)
    with open_image(source, max_pixels, max_aspect) as image:  # the header checked there
        return _decoded(image, _source_name(source), draft_size)


def _decoded(image: Image.Image, name: str, draft_size: int | None, detach: bool = True) -> Image.Image:
    """The decoded image, EXIF orientation applied; with detach=False an upright image is `image` itself (not a
    copy), which is only valid until its file is closed."""
    width, height = image.size
    try:
        if draft_size and image.format == "JPEG":
            # JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 size directly: several times faster.
            image.draft("RGB", (draft_size, draft_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
        orientation = image.getexif().get(0x0112, 1)
        if detach or orientation != 1:
            # a new image (transposed, or a plain copy when upright), so the file behind `image` can be closed
            image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    # the draft decode may be smaller than the file: keep the photo's own size (as displayed) for the caller
    image.info["original_size"] = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale as 8-bit "L", rescaled where the data is deeper; others as they are.

    PIL's convert("L") or convert("RGB") clips these at 255 instead of rescaling: a 16-bit photo came out white. Data
    that PIL's conversion already handled (8-bit values in a wider mode, floats 0..255) comes out exactly as it did."""
    if image.mode in _MODES_16BIT or image.mode == "I":
        out = _integer_to_8bit(np.asarray(image))
    elif image.mode == "F":
        out = _float_to_8bit(image)
    else:
        return image
    converted = Image.fromarray(out)
    if "original_size" in image.info:
        converted.info["original_size"] = image.info["original_size"]
    return converted


def _integer_to_8bit(values: np.ndarray) -> np.ndarray:
    """Integer grayscale -> uint8, at the smallest usual bit depth that holds the data.

    Neither mode I nor a 16-bit file says what depth its values use. L -> I or L -> I;16 conversions, and 8-bit data
    saved as 16-bit, hold 0..255: those values are kept as they are, exactly what PIL's clipping conversion gave.
    16-bit PNG and TIFF data (0..65535) is divided by 257, rounded, so an 8-bit value stored as v * 257 comes back
    exactly. Anything larger is stretched from 0 to its maximum. A really 16-bit image that is so dark that nothing
    exceeds 255 reads as 8-bit, and brighter: the data cannot tell the two apart."""
    top = int(values.max())
    if top <= 255:
        return np.clip(values, 0, 255).astype(np.uint8)
    if top <= 65535:
        # v / 257, rounded: 257 is odd, so there are no ties to break
        return ((np.clip(values, 0, None).astype(np.uint32) + 128) // 257).astype(np.uint8)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def _float_to_8bit(image: Image.Image) -> np.ndarray:
    """Float grayscale -> uint8: 0..1 data (numpy, float TIFF) scaled by 255, anything else PIL's own conversion.

    PIL's F -> L clips to 0..255 and truncates towards zero (12.7 -> 12, 300 -> 255, -3 -> 0), which is what 0..255
    float data (PIL's L -> F) always got; it is kept bit for bit. Data whose finite maximum is at most 1.0 is taken
    as 0..1 and scaled by 255, rounded. convert() would turn it black. An all but black 0..255 image (nothing brighter
    than 1) is also read as 0..1 and comes out stretched: the data cannot tell the two apart. NaN is black."""
    values = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(values)
    top = float(values[finite].max()) if finite.any() else 0.0
    # NaN made 0 before PIL sees it (its conversion leaves NaN undefined); +-inf clip to 255 and 0 as in PIL
    clean = np.where(np.isnan(values), np.float32(0), values)
    if top <= 1.0:
        return np.clip(np.rint(clean.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(clean).convert("L"))


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
    """Decode a photo (EXIF orientation applied, fast JPEG draft) into an RGB image; InvalidImageError if bad.

    Bad includes more than MAX_PHOTO_ASPECT between its sides: the centre crop would show next to nothing."""
    prep = prep or Preprocessing()
    return _photo_rgb(_decode(source, prep.max_pixels, draft_size=prep.image_size, max_aspect=MAX_PHOTO_ASPECT))


def _photo_rgb(image: Image.Image) -> Image.Image:
    image = _flatten_alpha(to_8bit(image))
    return image.convert("RGB") if image.mode != "RGB" else image


def load_photo_pixels(
    source: str | Path | bytes | BinaryIO, prep: Preprocessing
) -> tuple[np.ndarray, tuple[int, int]]:
    """A photo file straight to its model-sized RGB pixels (uint8, HWC) and its own size: exactly
    resize_photo(load_photo(source)) and original_size.

    An upright photo is resized from the decoded file itself, without the full-size copy load_photo makes so that
    it can outlive the file: about an eighth of the decoding work for a 256 px JPEG."""
    with open_image(source, prep.max_pixels, MAX_PHOTO_ASPECT) as image:  # the header checked there
        decoded = _decoded(image, _source_name(source), prep.image_size, detach=False)
        photo = _photo_rgb(decoded)
        return np.asarray(resize_photo(photo, prep.image_size)), original_size(decoded)


def prepare_photo_file(
    source: str | Path | bytes | BinaryIO, prep: Preprocessing
) -> tuple[np.ndarray, tuple[int, int]]:
    """A photo file -> its model input (CHW float32) and its own size, the bulk path: bit for bit what
    prepare_photo(load_photo(source)) gives, without load_photo's full-size copy (load_photo_pixels)."""
    pixels, size = load_photo_pixels(source, prep)
    return _normalise(pixels, prep), size


def load_sketch(source: ImageSource, prep: Preprocessing | None = None) -> Image.Image:
    """Decode a sketch into grayscale, black ink on white, whatever its mode or polarity."""
    prep = prep or Preprocessing()
    image = _flatten_alpha(to_8bit(_decode(source, prep.max_pixels)))
    gray = image.convert("L")
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if float(np.median(border)) < 128:  # white strokes on a dark background: invert
        gray = ImageOps.invert(gray)
    name = _source_name(source)
    if name != "<bytes>":  # crop_sketch names it when the sketch is empty: one of thousands, say which
        gray.info["source"] = name
    return gray


def full_square_limit(prep: Preprocessing) -> int:
    """The longest square side crop_sketch pads at full resolution, exactly as always, for these settings: a
    square of 4 x prep.max_pixels pixels, at least MAX_SKETCH_SQUARE."""
    return max(MAX_SKETCH_SQUARE, math.isqrt(4 * prep.max_pixels))


def crop_sketch(sketch: Image.Image, prep: Preprocessing) -> Image.Image:
    """Crop a black-on-white sketch to its ink with a margin and pad it to a white square.

    A square longer than full_square_limit(prep) (only a long stroke across a long strip makes one) comes out
    scaled down to SCALED_SKETCH_SQUARE."""
    gray = sketch.convert("L")
    pixels = np.asarray(gray)
    ink = pixels < (255 - prep.ink_level)
    if int(ink.sum()) < 4:
        source = sketch.info.get("source")
        raise EmptySketchError(f"{source + ': ' if source else ''}the sketch is empty: no strokes were found")
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = int(round(side * (1 + 2 * prep.sketch_margin))) + 2
    cy, cx = (top + bottom) / 2, (left + right) / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    # only the part of the square inside the image is copied; the rest of the square is white paper
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + side, gray.width), min(y0 + side, gray.height)
    if side <= full_square_limit(prep):
        # copied with numpy, not Image.crop: PIL's bomb check would warn or raise for a large crop of an image that
        # has passed our own limit already
        square = np.full((side, side), 255, dtype=np.uint8)
        square[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = pixels[iy0:iy1, ix0:ix1]
        return Image.fromarray(square)
    # scale the image part down first, then pad: memory follows SCALED_SKETCH_SQUARE, not the stroke's length
    target = SCALED_SKETCH_SQUARE
    scale = target / side
    canvas = Image.new("L", (target, target), 255)
    dx0, dx1, sx0, sx1 = _canvas_span(ix0 - x0, ix1 - x0, scale, target)
    dy0, dy1, sy0, sy1 = _canvas_span(iy0 - y0, iy1 - y0, scale, target)
    box = (x0 + sx0, y0 + sy0, x0 + sx1, y0 + sy1)
    # reducing_gap: an integer box reduction first keeps PIL's filter tables small for huge reduction factors
    part = gray.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    canvas.paste(part, (dx0, dy0))
    return canvas


def _canvas_span(start: int, stop: int, scale: float, limit: int) -> tuple[int, int, float, float]:
    """Where the square's [start, stop) (source pixels) lands on a canvas scaled by `scale`, and the source to fill it.

    Rounded inwards, so the source stays inside the image and is sampled exactly where resizing the whole square
    would sample it (the sliver left over is paper); a span under a pixel across goes whole into its middle pixel."""
    first, last = math.ceil(start * scale), math.floor(stop * scale)
    if last > first:
        return first, last, min(max(first / scale, start), stop), min(max(last / scale, start), stop)
    middle = min(max(int((start + stop) / 2 * scale), 0), limit - 1)
    return middle, middle + 1, start, stop


def _scaled(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 values -> (x - mean) / std in float32 arithmetic, same shape: exactly the float32 values of a 256-entry
    table, at half a table lookup's cost (decoding and scaling share the CPU with the model during bulk ingestion)."""
    out = np.empty(pixels.shape, dtype=np.float32)
    np.subtract(pixels, np.float32(prep.mean), out=out, dtype=np.float32)
    out /= np.float32(prep.std)
    return out


def _normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """HWC or HW uint8 -> CHW float32, scaled as the model expects."""
    if pixels.dtype == np.uint8:
        if prep.channels == 1 and pixels.ndim == 3 and pixels.shape[2] == 3:
            return _normalise(pixels.astype(np.float32), prep)
        arr = _scaled(pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None], prep)
        if prep.channels == 3 and arr.shape[0] == 1:
            return np.repeat(arr, 3, axis=0)
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
    """Resize the shorter side to `size` and centre-crop a square; the work is bounded by `size` at any aspect.

    Up to MAX_PHOTO_ASPECT between the sides, the whole photo is resized and then cropped, exactly as always."""
    w, h = photo.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if not _too_elongated(w, h, MAX_PHOTO_ASPECT):
        # every photo load_photo accepts: the arithmetic the shipped models were trained with, bit for bit
        resized = photo.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        if (nw, nh) == (size, size):  # a square photo: nothing to crop (crop would only copy it)
            return resized
        return resized.crop((left, top, left + size, top + size))
    # only a direct caller's strip beyond MAX_PHOTO_ASPECT: resample just the region under the crop (its edges in
    # source pixels) so the work stays bounded. Close to the whole resize but not bit-identical: PIL's float
    # rounding differs with the box, one level in up to a quarter of the values for some strips
    box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
    return photo.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def prepare_photo(photo: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded photo -> normalised CHW float32 model input."""
    return _normalise(np.asarray(resize_photo(photo, prep.image_size)), prep)


def normalise_batch(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Photos' uint8 pixels (N, H, W, 3) -> model inputs (N, C, H, W) float32: the same values as stacking
    prepare_photo's, in one pass over the batch."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3 or prep.channels != 3:
        return np.stack([_normalise(p, prep) for p in pixels])
    return _scaled(pixels.transpose(0, 3, 1, 2), prep)


def prepare_sketch(sketch: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded sketch -> ink crop, white square, normalised CHW float32 model input."""
    square = crop_sketch(sketch, prep)
    resized = square.resize((prep.image_size, prep.image_size), Image.Resampling.LANCZOS)
    return _normalise(np.asarray(resized), prep)
