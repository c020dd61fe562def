"""Pack the training data small enough to travel to a lent GPU machine (64 MiB with the repository).

    .venv/bin/python bench/pack_for_device.py [--data ../shared/data] [--pseudo .cache/pseudo] [--out .cache/device]

Writes OUT/devdata.tgz holding data/<set>/{photo,sketch}/... and pseudo/<set>/... in the Sketchy layout that
`sketchsearch train` reads. Photos are resized exactly as training resizes them (shorter side to 192 px, centre
crop) and stored as WebP quality 90, so that the trainer's own resize becomes the identity; sketches and HED
pseudo-sketches are stored as lossless WebP (pseudo-sketches keep their .png names, which the trainer looks for;
PIL reads by content). One gzip file rather than ~11,000 small ones, whose disk blocks would count.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from encoder.preprocess import Preprocessing, load_photo, resize_photo

SETS = ("sketchy100", "qmul-shoes/train", "qmul-shoes/test")


def pack(data: Path, pseudo: Path, work: Path, size: int) -> int:
    prep = Preprocessing(image_size=size)
    count = 0
    for name in SETS:
        for path in sorted((data / name / "photo").rglob("*.jpg")):
            out = work / "data" / name / "photo" / path.parent.name / f"{path.stem}.webp"
            out.parent.mkdir(parents=True, exist_ok=True)
            resize_photo(load_photo(path, prep), size).save(out, "WEBP", quality=90, method=6)
            count += 1
        for path in sorted((data / name / "sketch").rglob("*.png")):
            out = work / "data" / name / "sketch" / path.parent.name / f"{path.stem}.webp"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("L").save(out, "WEBP", lossless=True, method=4)
            count += 1
    for path in sorted(pseudo.rglob("*.png")):
        out = work / "pseudo" / path.relative_to(pseudo)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(out, "WEBP", lossless=True, method=4)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data", type=Path, default=root / ".." / "shared" / "data")
    parser.add_argument("--pseudo", type=Path, default=root / ".cache" / "pseudo")
    parser.add_argument("--out", type=Path, default=root / ".cache" / "device")
    parser.add_argument("--size", type=int, default=192, help="photo side in pixels: the model's input size")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        count = pack(args.data, args.pseudo, Path(tmp), args.size)
        target = args.out / "devdata.tgz"
        with tarfile.open(target, "w:gz") as tar:
            tar.add(Path(tmp) / "data", arcname="data")
            tar.add(Path(tmp) / "pseudo", arcname="pseudo")
    print(f"{count} images -> {target} ({target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
