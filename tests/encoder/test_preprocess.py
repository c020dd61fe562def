"""Preprocessing: sketches in any mode, polarity, offset or size embed alike; bad files give a clear error."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from encoder.embedder import Embedder, load_embedder
from encoder.errors import EmptySketchError, InvalidImageError
from encoder.preprocess import (
    DEFAULT_MAX_PIXELS,
    MAX_PHOTO_ASPECT,
    MAX_SKETCH_SQUARE,
    Preprocessing,
    crop_sketch,
    full_square_limit,
    load_photo,
    load_photo_pixels,
    load_sketch,
    normalise_batch,
    open_image,
    original_size,
    prepare_photo,
    prepare_photo_file,
    prepare_sketch,
    resize_photo,
)
from encoder.pseudo_sketch import load_photo as load_pseudo_sketch_photo
from encoder.train import ink_share

REPO = Path(__file__).resolve().parents[2]


def drawn_sketch(size: int = 256) -> Image.Image:
    """A house with a sun: black strokes on white, off-centre like a real drawing."""
    image = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(image)
    s = size / 256
    d.rectangle([60 * s, 110 * s, 170 * s, 200 * s], outline=0, width=max(1, int(3 * s)))
    d.line([60 * s, 110 * s, 115 * s, 60 * s, 170 * s, 110 * s], fill=0, width=max(1, int(3 * s)))
    d.rectangle([100 * s, 150 * s, 125 * s, 200 * s], outline=0, width=max(1, int(3 * s)))
    d.ellipse([185 * s, 30 * s, 225 * s, 70 * s], outline=0, width=max(1, int(3 * s)))
    return image


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_inverted_sketch_embeds_like_the_original(embedder: Embedder) -> None:
    sketch = drawn_sketch()
    inverted = ImageOps.invert(sketch)
    a, b = embedder.embed_sketches([sketch, inverted])
    assert np.abs(a - b).max() < 1e-5


def test_transparent_background_means_white(embedder: Embedder) -> None:
    sketch = drawn_sketch()
    rgba = Image.new("RGBA", sketch.size, (0, 0, 0, 0))  # transparent *black*: must still read as paper
    ink = Image.new("RGBA", sketch.size, (0, 0, 0, 255))
    rgba.paste(ink, mask=ImageOps.invert(sketch))
    la = rgba.convert("LA")
    a, b, c = embedder.embed_sketches([sketch, rgba, la])
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - c).max() < 1e-5


def test_rgb_and_file_inputs_embed_alike(embedder: Embedder, tmp_path: Path) -> None:
    sketch = drawn_sketch()
    path = tmp_path / "s.png"
    sketch.convert("RGB").save(path)
    a, b, c = embedder.embed_sketches([sketch, path, path.read_bytes()])
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - c).max() < 1e-5


def test_offset_sketch_on_a_larger_canvas_embeds_alike(embedder: Embedder) -> None:
    sketch = drawn_sketch()
    canvas = Image.new("L", (700, 500), 255)
    canvas.paste(sketch, (400, 230))
    a, b = embedder.embed_sketches([sketch, canvas])
    assert cosine(a, b) > 0.99


def test_tiny_sketch_embeds_close_to_the_full_size_one(embedder: Embedder) -> None:
    big = drawn_sketch(256)
    tiny = drawn_sketch(64)
    other = Image.new("L", (256, 256), 255)
    ImageDraw.Draw(other).line([20, 230, 230, 20], fill=0, width=3)
    a, b, c = embedder.embed_sketches([big, tiny, other])
    # whitening spreads all cosines (the shipped 85ef2013 unwhitened: 0.90 and 0.34; whitened: 0.82 and 0.21), so
    # the margin over an unrelated sketch is checked beside the absolute value
    assert cosine(a, b) > 0.8
    assert cosine(a, b) - cosine(a, c) > 0.5


def test_crop_keeps_the_ink_centred_and_square() -> None:
    prep = Preprocessing()
    canvas = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(canvas).rectangle([250, 150, 290, 170], outline=0, width=2)
    square = crop_sketch(canvas, prep)
    assert square.width == square.height
    pixels = np.asarray(square)
    ink = np.argwhere(pixels < 128)
    centre = ink.mean(axis=0)
    assert abs(centre[0] - square.height / 2) < 3 and abs(centre[1] - square.width / 2) < 3
    # the border outside the drawing is white, not the black that crop() fills beyond the image
    assert pixels[0].min() == 255 and pixels[-1].min() == 255


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_empty_sketch_is_a_clear_error(mode: str) -> None:
    blank = Image.new(mode, (128, 128), "white")
    with pytest.raises(EmptySketchError, match="empty"):
        prepare_sketch(load_sketch(blank), Preprocessing())


def test_fully_transparent_sketch_is_empty() -> None:
    with pytest.raises(EmptySketchError):
        prepare_sketch(load_sketch(Image.new("RGBA", (64, 64), (0, 0, 0, 0))), Preprocessing())


def _jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_files_give_a_clear_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    data = bytearray(_jpeg_bytes((256, 256)))
    data[200:600] = b"\x00" * 400
    corrupt.write_bytes(bytes(data[:700]))
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (0, 90, 0)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (corrupt, truncated, text, empty, tmp_path / "missing.jpg", tmp_path):
        for load in (load_photo, lambda p: load_photo_pixels(p, Preprocessing())):
            with pytest.raises(InvalidImageError) as info:
                load(path)
            assert path.name in str(info.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000), 255).save(big)
    with pytest.raises(InvalidImageError, match="exceeds the limit"):
        load_photo(big, Preprocessing(max_pixels=1_000_000))
    with pytest.raises(InvalidImageError, match="exceeds the limit"):
        load_sketch(big, Preprocessing(max_pixels=1_000_000))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif)
    assert load_photo(path).size == (40, 80)


def test_photo_modes_are_normalised(tmp_path: Path) -> None:
    prep = Preprocessing()
    for mode in ("L", "P", "RGBA", "CMYK", "I;16"):
        image = (
            Image.new("RGB", (300, 200), (10, 120, 240)).convert(mode)
            if mode != "I;16"
            else Image.new(mode, (300, 200))
        )
        arr = prepare_photo(load_photo(image, prep), prep)
        assert arr.shape == (3, 224, 224)
        assert np.isfinite(arr).all()


def test_the_bulk_photo_path_prepares_exactly_as_load_and_prepare(tmp_path: Path) -> None:
    """embed_photo_files decodes without the full-size copy and scales by arithmetic: the same inputs, bit for bit."""
    rng = np.random.default_rng(3)

    def noise(width: int, height: int) -> Image.Image:
        return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(300, 200).save(rotated, "JPEG", exif=exif)
    files = {"square.jpg": noise(256, 256), "wide.jpg": noise(300, 200), "large.jpg": noise(1200, 900),
             "gray.jpg": noise(200, 260).convert("L"), "alpha.png": noise(240, 180).convert("RGBA"),
             "deep.png": Image.fromarray((rng.random((150, 170)) * 65535).astype(np.uint16))}
    for name, image in files.items():
        image.save(tmp_path / name)
    frames = [noise(64, 48), noise(64, 48)]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    paths = [rotated, *(tmp_path / name for name in files), tmp_path / "two.gif"]
    for prep in (Preprocessing(image_size=192), Preprocessing(image_size=64, channels=1, mean=0.0, std=255.0)):
        photos = [load_photo(p, prep) for p in paths]
        pixels, sizes = zip(*(load_photo_pixels(p, prep) for p in paths), strict=True)
        assert list(sizes) == [original_size(photo) for photo in photos]
        assert sizes[0] == (200, 300)  # EXIF orientation applied
        for photo, ours in zip(photos, pixels, strict=True):
            assert ours.dtype == np.uint8
            assert np.array_equal(ours, np.asarray(resize_photo(photo, prep.image_size)))
        expected = np.stack([prepare_photo(photo, prep) for photo in photos])
        batch = normalise_batch(np.stack(pixels), prep)
        assert batch.dtype == np.float32 and batch.shape == expected.shape
        assert np.array_equal(batch, expected)
        for path, photo, want in zip(paths, photos, expected, strict=True):
            got, size = prepare_photo_file(path, prep)
            assert np.array_equal(got, want) and size == original_size(photo)
    assert not {str(p.resolve()) for p in paths} & _open_paths()


def test_scaling_gives_the_float32_table_the_models_were_trained_with() -> None:
    """Inputs were once scaled through a 256-entry float32 table; the arithmetic that replaced it must match it."""
    values = np.arange(256, dtype=np.uint8)
    for mean, std in ((127.0, 128.0), (0.0, 255.0), (0.5, 0.229), (123.675, 58.395), (-3.0, 1e-3)):
        prep = Preprocessing(image_size=16, mean=mean, std=std)
        table = (np.arange(256, dtype=np.float32) - np.float32(mean)) / np.float32(std)
        rgb = np.stack([values.reshape(16, 16)] * 3, axis=2)  # every value once, in each channel
        assert np.array_equal(prepare_photo(Image.fromarray(rgb), prep)[0], table.reshape(16, 16))
        assert np.array_equal(normalise_batch(rgb[None], prep)[0, 1], table.reshape(16, 16))


def test_jpeg_draft_decode_matches_full_decode_closely(tmp_path: Path) -> None:
    prep = Preprocessing()
    rng = np.random.default_rng(0)
    pixels = (rng.random((900, 1200, 3)) * 40 + np.linspace(0, 200, 1200)[None, :, None]).astype(np.uint8)
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    fast = load_photo(path, prep)
    assert min(fast.size) >= prep.image_size  # draft never goes below the model's input size
    full = Image.open(path).convert("RGB")
    a, b = prepare_photo(fast, prep), prepare_photo(full, prep)
    assert np.abs(a - b).mean() < 0.05


# ---------------------------------------------------------------- very thin images: bounded work and memory


def _peak_rss_growth_mb(script: str) -> dict[str, object]:
    """Run `script` in a fresh interpreter and return its JSON result with `peak_mb`, its peak RSS growth.

    A fresh process, because the test process's own peak (the model fixture) would hide any growth: VmHWM, the peak
    of the new program alone (ru_maxrss carries the parent's over from the fork). Its address space is capped at
    1.5 GiB over the imports' too, so a regression fails with MemoryError rather than thrashing the machine."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status for the peak memory of a process")
    prelude = (
        "import json, resource\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from encoder.errors import InvalidImageError\n"
        "from encoder.preprocess import Preprocessing, load_photo, load_sketch, prepare_sketch, resize_photo\n"
        "def status_kb(key):\n"
        "    return int(next(line for line in open('/proc/self/status') if line.startswith(key)).split()[1])\n"
        "resource.setrlimit(resource.RLIMIT_AS, (status_kb('VmSize:') * 1024 + 1536 * 2**20, resource.RLIM_INFINITY))\n"
        "base = status_kb('VmHWM:')\n"
        "out = {}\n"
    )
    epilogue = "\nout['peak_mb'] = (status_kb('VmHWM:') - base) / 1024\nprint(json.dumps(out))\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + script + epilogue], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_60000x1_photo_is_refused_and_resizing_it_stays_small(tmp_path: Path) -> None:
    # before: the short side was scaled to 224 first, an 11.5M x 192 intermediate (6.6 GB) before the crop
    path = tmp_path / "strip.png"
    pixels = np.zeros((1, 60000, 3), dtype=np.uint8)
    pixels[0, :, 0] = ((np.arange(60000) + 50) // 100) % 256  # steps of 100 columns, one centred on the middle
    Image.fromarray(pixels).save(path)
    result = _peak_rss_growth_mb(
        f"""
try:
    load_photo({str(path)!r})
except InvalidImageError as exc:
    out['error'] = str(exc)
with Image.open({str(path)!r}) as im:
    strip = im.convert('RGB')
square = resize_photo(strip, 224)
out['size'] = list(square.size)
# the crop is the strip's centre, about one source pixel around column 30000, stretched over the square
out['red'] = sorted(set(np.asarray(square)[:, :, 0].ravel().tolist()))
"""
    )
    assert "elongated" in str(result["error"]) and "strip.png" in str(result["error"])
    assert result["size"] == [224, 224]
    assert result["red"] == [300 % 256]
    assert float(result["peak_mb"]) < 200  # type: ignore[arg-type]


def test_a_200000x50_sketch_with_one_long_stroke_is_bounded(tmp_path: Path) -> None:
    # before: the ink crop was padded to a 224,000-pixel square canvas at full resolution: MemoryError
    path = tmp_path / "stroke.png"
    image = Image.new("L", (200_000, 50), 255)
    ImageDraw.Draw(image).line([(100, 24), (199_900, 24)], fill=0, width=3)
    image.save(path)
    del image
    result = _peak_rss_growth_mb(
        f"""
arr = prepare_sketch(load_sketch({str(path)!r}), Preprocessing())
out['shape'] = list(arr.shape)
out['finite'] = bool(np.isfinite(arr).all())
rows = arr[0].mean(axis=1)
out['darkest_row'] = int(rows.argmin())
out['contrast'] = float(rows.max() - rows.min())
"""
    )
    assert result["shape"] == [3, 224, 224] and result["finite"]
    # the stroke, however faint at this scale, lies across the middle of the square
    assert abs(int(result["darkest_row"]) - 112) <= 1  # type: ignore[call-overload]
    assert float(result["contrast"]) > 0  # type: ignore[arg-type]
    assert float(result["peak_mb"]) < 200  # type: ignore[arg-type]


def test_a_long_crop_scaled_down_first_prepares_like_the_full_size_square(monkeypatch: pytest.MonkeyPatch) -> None:
    prep = Preprocessing(max_pixels=16_000_000)  # a limit of 8192 px, so that the full-size square stays small
    # a zigzag stroke whose ink square is just over full_square_limit, so it is scaled down before padding
    limit = full_square_limit(prep)
    width = int(limit * 1.05)
    sketch = Image.new("L", (width, 400), 255)
    points = [(x, 60 if (x // 700) % 2 else 340) for x in range(100, width - 100, 350)]
    ImageDraw.Draw(sketch).line(points, fill=0, width=30)
    scaled = crop_sketch(sketch, prep)
    assert scaled.width == scaled.height < MAX_SKETCH_SQUARE
    ours = prepare_sketch(sketch, prep)
    monkeypatch.setattr("encoder.preprocess.MAX_SKETCH_SQUARE", 10 * width)  # the full-size square, as before
    assert crop_sketch(sketch, prep).width > limit
    full = prepare_sketch(sketch, prep)
    assert np.abs(ours - full).max() * prep.std <= 4  # grey levels, at the stroke's edges
    assert np.abs(ours - full).mean() * prep.std < 0.1


def test_too_elongated_photos_are_refused_up_to_the_bound(tmp_path: Path) -> None:
    prep = Preprocessing()
    ok, wide, tall = tmp_path / "ok.png", tmp_path / "wide.png", tmp_path / "tall.png"
    side = 20
    Image.new("RGB", (int(side * MAX_PHOTO_ASPECT), side), (10, 200, 30)).save(ok)
    Image.new("RGB", (int(side * MAX_PHOTO_ASPECT) + 1, side), (10, 200, 30)).save(wide)
    Image.new("RGB", (side, int(side * MAX_PHOTO_ASPECT) + 1), (10, 200, 30)).save(tall)
    assert prepare_photo(load_photo(ok, prep), prep).shape == (3, 224, 224)
    assert load_photo_pixels(ok, prep)[0].shape == (224, 224, 3)
    for path in (wide, tall):
        for load in (load_photo, load_photo_pixels):
            with pytest.raises(InvalidImageError, match="elongated") as info:
                load(path, prep)
            assert path.name in str(info.value)


def test_strips_beyond_the_bound_resize_close_to_a_whole_resize() -> None:
    # only a direct caller of resize_photo can pass one (load_photo refuses it): resampled under the crop alone
    rng = np.random.default_rng(1)
    for w, h in ((12000, 90), (90, 12000)):
        strip = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        ours = np.asarray(resize_photo(strip, 224)).astype(int)
        theirs = np.asarray(_old_resize_photo(strip, 224)).astype(int)
        assert np.abs(ours - theirs).max() <= 1


# ---------------------------------------------------------------- exactly the old preprocessing where it was right


def _old_resize_photo(photo: Image.Image, size: int) -> Image.Image:
    """resize_photo before bounding thin images (HEAD~1 of 9ace5f4), verbatim: what the shipped models were fed."""
    w, h = photo.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = photo.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _old_crop_sketch(sketch: Image.Image, prep: Preprocessing) -> Image.Image:
    """crop_sketch before bounding long strokes, verbatim: a full-size white square, the crop pasted in."""
    pixels = np.asarray(sketch.convert("L"))
    ink = pixels < (255 - prep.ink_level)
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = int(round(side * (1 + 2 * prep.sketch_margin))) + 2
    cy, cx = (top + bottom) / 2, (left + right) / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    canvas = Image.new("L", (side, side), 255)
    canvas.paste(sketch.convert("L").crop((x0, y0, x0 + side, y0 + side)), (0, 0))
    out = np.asarray(canvas).copy()  # crop() outside the image fills black: repaint those parts white
    if x0 < 0:
        out[:, :-x0] = 255
    if y0 < 0:
        out[:-y0, :] = 255
    if x0 + side > sketch.width:
        out[:, sketch.width - x0 :] = 255
    if y0 + side > sketch.height:
        out[sketch.height - y0 :, :] = 255
    return Image.fromarray(out)


def _old_model_input(square: Image.Image, prep: Preprocessing) -> np.ndarray:
    """(x - mean) / std in float32, channels first and replicated to 3 for grayscale."""
    arr = (np.asarray(square, dtype=np.float32) - np.float32(prep.mean)) / np.float32(prep.std)
    return np.repeat(arr[None], 3, axis=0) if arr.ndim == 2 else arr.transpose(2, 0, 1)


@pytest.mark.parametrize(
    ("width", "height"),
    [(136, 2310), (6000, 300), (300, 6000), (50, 2500), (2500, 50), (40, 3960), (9900, 100), (30, 3000)],
)
def test_photos_up_to_the_aspect_bound_prepare_exactly_as_before(width: int, height: int) -> None:
    # 17:1 to 100:1: the resized photo is far longer than the crop; still resized whole, as the models were trained
    prep = Preprocessing()
    rng = np.random.default_rng(width * height)
    photo = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
    loaded = load_photo(photo, prep)
    expected = _old_resize_photo(photo, prep.image_size)
    assert np.array_equal(np.asarray(resize_photo(loaded, prep.image_size)), np.asarray(expected))
    assert np.array_equal(prepare_photo(loaded, prep), _old_model_input(expected, prep))


def test_full_square_limit_covers_images_at_the_pixel_limit_up_to_3_to_1() -> None:
    prep = Preprocessing()
    assert full_square_limit(prep) == 16_000  # a square of 4 x max_pixels
    # the square of a 3:1 image at the pixel limit, its ink from end to end, fits
    long_side = int((3 * prep.max_pixels) ** 0.5)
    assert round(long_side * (1 + 2 * prep.sketch_margin)) + 2 <= full_square_limit(prep)
    assert full_square_limit(Preprocessing(max_pixels=1_000_000)) == MAX_SKETCH_SQUARE  # never below it


def test_a_large_sketch_within_the_pixel_limit_is_padded_exactly_as_before() -> None:
    # two dots in opposite corners of an 8100 x 7900 sheet (64.0 M pixels, just within the limit): its square,
    # 9074 px, is over MAX_SKETCH_SQUARE and over the side of a square image at the limit
    prep = Preprocessing()
    sketch = Image.new("L", (8100, 7900), 255)
    draw = ImageDraw.Draw(sketch)
    draw.rectangle([0, 0, 1, 1], fill=0)
    draw.rectangle([8098, 7898, 8099, 7899], fill=0)
    ours = crop_sketch(sketch, prep)
    assert MAX_SKETCH_SQUARE < ours.width == ours.height <= full_square_limit(prep)
    old = _old_crop_sketch(sketch, prep)
    assert np.array_equal(np.asarray(ours), np.asarray(old))
    del ours
    expected = _old_model_input(old.resize((prep.image_size, prep.image_size), Image.Resampling.LANCZOS), prep)
    assert np.array_equal(prepare_sketch(sketch, prep), expected)


def test_crop_sketch_does_not_go_through_pils_bomb_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # the image passed our own limit already: a large crop of it must not warn or fail on PIL's global one
    prep = Preprocessing()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    sketch = drawn_sketch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = crop_sketch(sketch, prep)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert np.array_equal(np.asarray(ours), np.asarray(_old_crop_sketch(sketch, prep)))


def test_8bit_values_in_16bit_modes_load_exactly_as_before(tmp_path: Path) -> None:
    # PIL's own L -> I;16, numpy's uint16 and files saved from them hold 0..255: PIL's conversion was right for them
    prep = Preprocessing()
    gray = Image.fromarray(_photo_like_gray())
    png = tmp_path / "g16.png"
    Image.fromarray(np.asarray(gray).astype(np.uint16)).save(png)
    with Image.open(png) as check:
        assert check.mode.startswith("I;16")
    big_endian = Image.frombytes("I;16B", gray.size, np.asarray(gray).astype(">u2").tobytes())
    expected = np.asarray(load_photo(gray, prep))
    for source in (gray.convert("I;16"), Image.fromarray(np.asarray(gray).astype(np.uint16)), png, big_endian):
        loaded = load_photo(source, prep)
        assert np.array_equal(np.asarray(loaded), expected), source
    assert np.array_equal(np.asarray(gray.convert("I;16").convert("RGB")), expected)  # the old route: PIL's clip

    sketch = drawn_sketch()
    expected_sketch = prepare_sketch(load_sketch(sketch, prep), prep)
    for source16 in (sketch.convert("I;16"), Image.fromarray(np.asarray(sketch).astype(np.uint16))):
        assert np.array_equal(prepare_sketch(load_sketch(source16, prep), prep), expected_sketch)


def test_float_images_load_exactly_as_pil_converted_them() -> None:
    prep = Preprocessing()
    gray = Image.fromarray(_photo_like_gray())
    # PIL's L -> F: whole numbers 0..255, the 8-bit photo exactly
    assert np.array_equal(np.asarray(load_photo(gray.convert("F"), prep)), np.asarray(load_photo(gray, prep)))
    # fractions and values out of range: PIL clips and truncates (12.7 -> 12, 300 -> 255, -3 -> 0), kept bit for bit
    values = np.asarray(gray, dtype=np.float32) + np.float32(0.7)
    values[0, :3] = (12.7, 300.0, -3.0)
    floats = Image.fromarray(values)
    assert np.array_equal(np.asarray(load_photo(floats, prep)), np.asarray(floats.convert("RGB")))  # the old route
    assert np.asarray(load_photo(floats, prep))[0, :3, 0].tolist() == [12, 255, 0]

    sketch = drawn_sketch()
    fractional = Image.fromarray(np.asarray(sketch, dtype=np.float32) * np.float32(0.9) + np.float32(12.7))
    assert np.array_equal(np.asarray(load_sketch(fractional, prep)), np.asarray(fractional.convert("L")))
    assert np.array_equal(
        prepare_sketch(load_sketch(sketch.convert("F"), prep), prep), prepare_sketch(load_sketch(sketch, prep), prep)
    )


# ---------------------------------------------------------------- 16-bit and float grayscale


def _photo_like_gray(size: tuple[int, int] = (300, 200)) -> np.ndarray:
    rng = np.random.default_rng(3)
    h, w = size[1], size[0]
    ramp = np.linspace(0, 230, w)[None, :] + np.linspace(0, 20, h)[:, None]
    return np.clip(ramp + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)


def test_16bit_grayscale_prepares_like_its_8bit_original(tmp_path: Path) -> None:
    prep = Preprocessing()
    gray = _photo_like_gray()
    eight, sixteen, sixteen_big = tmp_path / "g8.png", tmp_path / "g16.png", tmp_path / "g16b.tif"
    Image.fromarray(gray).save(eight)
    Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen)
    # built from bytes: PIL's own I;16 -> I;16B conversion clips at 255 too
    big_endian = (gray.astype(">u2") * 257).tobytes()
    Image.frombytes("I;16B", (gray.shape[1], gray.shape[0]), big_endian).save(sixteen_big)
    with Image.open(sixteen) as check:
        assert check.mode.startswith("I;16")  # really stored as 16-bit
    expected = prepare_photo(load_photo(eight, prep), prep)
    int32 = Image.fromarray(gray.astype(np.int32) * 257)  # mode I holding 16-bit data
    unit_float = Image.fromarray(gray.astype(np.float32) / 255)  # mode F in 0..1
    for source in (sixteen, sixteen_big, int32, unit_float, Image.fromarray(gray.astype(np.int32))):
        got = prepare_photo(load_photo(source, prep), prep)
        assert np.abs(got - expected).max() <= 1 / prep.std, source  # at most a level of rounding

    sketch = np.asarray(drawn_sketch())
    sketch16 = tmp_path / "s16.png"
    Image.fromarray(sketch.astype(np.uint16) * 257).save(sketch16)
    assert np.array_equal(prepare_sketch(load_sketch(sketch16, prep), prep), prepare_sketch(drawn_sketch(), prep))


# ---------------------------------------------------------------- file handles and PIL's own bomb check


def _open_paths() -> set[str]:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd to list open files")
    paths = set()
    for fd in os.listdir(fd_dir):
        try:
            paths.add(os.readlink(fd_dir / fd))
        except OSError:
            continue
    return paths


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small real PNG whose header claims width x height: what a decompression bomb's header looks like."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: signature, length, type, then width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_a_refused_image_leaves_no_file_open(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("L", (300, 300), 255).save(big)
    for load in (load_photo, load_sketch):
        with pytest.raises(InvalidImageError, match="exceeds the limit") as info:
            load(big, Preprocessing(max_pixels=10_000))
        # the traceback (kept in `info`) still holds the decoder's frames: the file must be closed regardless
        assert str(big.resolve()) not in _open_paths(), info.value


def test_multi_frame_images_leave_no_file_open(tmp_path: Path) -> None:
    gif, tif = tmp_path / "two.gif", tmp_path / "two.tif"
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in (gif, tif):
            photo = load_photo(path)
            assert np.asarray(photo)[0, 0].tolist() == [200, 0, 0]  # the first frame
            assert str(path.resolve()) not in _open_paths()
            del photo
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_open_image_closes_its_file_on_error_inside(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("L", (32, 32), 0).save(path)
    with pytest.raises(RuntimeError), open_image(path):
        raise RuntimeError("caller failed")
    assert str(path.resolve()) not in _open_paths()


def test_pil_bomb_protection_is_left_on_for_every_loader(tmp_path: Path) -> None:
    assert Image.MAX_IMAGE_PIXELS is not None  # importing the encoder must not switch PIL's own check off
    side = int(DEFAULT_MAX_PIXELS**0.5) + 100
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, side, side)
    with pytest.raises(InvalidImageError, match="exceeds the limit"):
        ink_share(bomb)  # training's pseudo-sketch filter
    with pytest.raises(ValueError, match="exceeds the limit"):
        load_pseudo_sketch_photo(bomb, 256)  # the HED step, which counts a ValueError as a failed photo
    huge = tmp_path / "huge.png"
    _png_claiming(huge, 60_000, 60_000)  # beyond PIL's own limit too: still our clear error
    with pytest.raises(InvalidImageError, match="exceeds the limit"):
        load_photo(huge, Preprocessing(max_pixels=10**10))


def test_pils_bomb_warning_is_neither_printed_nor_an_error_within_our_limit(tmp_path: Path) -> None:
    # 95M pixels: over PIL's 89M limit (a warning there), under twice it (its error) and under our raised limit
    assert Image.MAX_IMAGE_PIXELS is not None
    side = int((Image.MAX_IMAGE_PIXELS * 1.06) ** 0.5)
    assert Image.MAX_IMAGE_PIXELS < side * side < min(2 * Image.MAX_IMAGE_PIXELS, 100_000_000)
    path = tmp_path / "large.png"
    _png_claiming(path, side, side)
    prep = Preprocessing(max_pixels=100_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_image(path, prep.max_pixels) as image:
            assert image.size == (side, side)
    assert not caught
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_image(path, prep.max_pixels) as image:
            assert image.size == (side, side)
        with pytest.raises(InvalidImageError, match="corrupt or truncated"):  # the header lies: 64 x 64 of data
            load_sketch(path, prep)
