"""Datasets in the Sketchy layout: <set>/photo/<category>/<stem>.jpg and <set>/sketch/<category>/<stem>-<n>.png."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from encoder.errors import DatasetError

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SKETCH_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".svg"} - {".svg"}


@dataclass(frozen=True)
class PhotoRecord:
    path: Path
    category: str
    stem: str


@dataclass(frozen=True)
class SketchRecord:
    path: Path
    category: str
    photo_stem: str  # the stem of the photo it was drawn from ('' when unknown)


@dataclass
class SketchyDataset:
    """An index of one folder in the Sketchy layout, optionally restricted to some categories."""

    root: Path
    photos: list[PhotoRecord]
    sketches: list[SketchRecord]

    @property
    def categories(self) -> list[str]:
        return sorted({p.category for p in self.photos} | {s.category for s in self.sketches})

    def photo_index(self) -> dict[tuple[str, str], int]:
        """(category, stem) -> position in photos."""
        return {(p.category, p.stem): i for i, p in enumerate(self.photos)}

    def instance_pairs(self) -> list[tuple[int, int]]:
        """(sketch index, photo index) for every sketch whose own photo is present."""
        index = self.photo_index()
        pairs = []
        for si, sketch in enumerate(self.sketches):
            pi = index.get((sketch.category, sketch.photo_stem))
            if pi is not None:
                pairs.append((si, pi))
        return pairs

    def subset(self, categories: set[str] | None = None, exclude: set[str] | None = None) -> SketchyDataset:
        def keep(category: str) -> bool:
            if categories is not None and category not in categories:
                return False
            return not (exclude and category in exclude)

        return SketchyDataset(
            self.root,
            [p for p in self.photos if keep(p.category)],
            [s for s in self.sketches if keep(s.category)],
        )


def _sketch_photo_stem(stem: str) -> str:
    base, sep, tail = stem.rpartition("-")
    return base if sep and tail.isdigit() else stem


def load_dataset(root: Path | str) -> SketchyDataset:
    """Index a folder in the Sketchy layout; DatasetError if it has neither photo/ nor sketch/."""
    root = Path(root)
    # said as such: "expected photo/ and sketch/" would send the user looking for a layout problem
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    photo_dir, sketch_dir = root / "photo", root / "sketch"
    if not photo_dir.is_dir() and not sketch_dir.is_dir():
        raise DatasetError(
            f"{root}: expected photo/<category>/ and sketch/<category>/ folders (Sketchy layout)"
        )
    photos = (
        [
            PhotoRecord(p, p.parent.name, p.stem)
            for p in sorted(photo_dir.glob("*/*"))
            if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
        ]
        if photo_dir.is_dir()
        else []
    )
    sketches = (
        [
            SketchRecord(p, p.parent.name, _sketch_photo_stem(p.stem))
            for p in sorted(sketch_dir.glob("*/*"))
            if p.is_file() and p.suffix.lower() in SKETCH_SUFFIXES
        ]
        if sketch_dir.is_dir()
        else []
    )
    return SketchyDataset(root, photos, sketches)


def check_categories(requested: Iterable[str], known: Iterable[str], what: str) -> None:
    """DatasetError naming the `requested` categories that are not among `known`: a misspelt category would
    otherwise be ignored silently and change what is trained on or measured. `what` says which ones they are
    ("held-out", "requested")."""
    unknown = sorted(set(requested) - set(known))
    if not unknown:
        return
    names = sorted(set(known))
    listed = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    noun = "category" if len(unknown) == 1 else "categories"
    raise DatasetError(
        f"unknown {what} {noun} {', '.join(unknown)}: the data's categories are {listed or 'none'}"
    )


# The validation split suggested by ../shared/data/README.md: categories never seen while choosing settings.
HELD_OUT_CATEGORIES = frozenset(
    {"bat", "cabin", "cow", "dolphin", "door", "giraffe", "helicopter", "mouse", "pear", "raccoon"}
)
