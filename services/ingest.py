"""Ingestion: photo files -> hashes -> embeddings of the photos not stored yet -> the vector store."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # runtime imports stay local: enqueueing (Celery mode) needs neither torch nor qdrant-client
    from services.gallery import Gallery

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class PhotoFile:
    """A file to ingest and the category it will be stored under."""

    path: Path
    category: str


@dataclass(frozen=True)
class IngestFailure:
    path: str
    reason: str


@dataclass
class IngestSummary:
    """What an ingestion did: photos added, photos already stored (same bytes), files that failed."""

    added: int = 0
    already_present: int = 0
    failures: list[IngestFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def processed(self) -> int:
        return self.added + self.already_present + self.failed

    def merge(self, other: IngestSummary) -> None:
        self.added += other.added
        self.already_present += other.already_present
        self.failures.extend(other.failures)
        self.seconds += other.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "already_present": self.already_present,
            "failed": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IngestSummary:
        return cls(
            added=int(data.get("added", 0)),
            already_present=int(data.get("already_present", 0)),
            failures=[IngestFailure(str(f["path"]), str(f["reason"])) for f in data.get("failed", [])],
            seconds=float(data.get("seconds", 0.0)),
        )


def _walk(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES and not path.name.startswith("."):
            yield path


def collect_photos(
    paths: Sequence[Path], label: str | None = None
) -> tuple[list[PhotoFile], list[IngestFailure]]:
    """Files and folders (walked recursively) -> photo files with absolute paths, each once, and the paths
    that cannot be ingested at all (missing, or a file named explicitly that is not a photo type)."""
    files: list[PhotoFile] = []
    rejected: list[IngestFailure] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        # the category is the folder the photo was found in, which for a symlinked photo is not the
        # folder of its target; the resolved path is what is stored and what makes it the same photo
        category = label or path.absolute().parent.name
        path = path.resolve()
        if path not in seen:
            seen.add(path)
            files.append(PhotoFile(path, category))

    for given in paths:
        if given.is_dir():
            for path in _walk(given):
                add(path)
        elif given.is_file():
            if given.suffix.lower() in PHOTO_SUFFIXES:
                add(given)
            else:
                rejected.append(
                    IngestFailure(str(given), f"not a photo type ({', '.join(sorted(PHOTO_SUFFIXES))})")
                )
        else:
            rejected.append(IngestFailure(str(given), "no such file or folder"))
    return files, rejected


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def ingest_batch(gallery: Gallery, files: Sequence[PhotoFile]) -> IngestSummary:
    """Ingest one batch: hash every file, look the ids up (hashing is cheap, embedding is not), embed and
    upsert only the new ones. Bad files become failures; store errors propagate (the batch can be redone:
    writes are idempotent by id)."""
    from services.vector_store import PhotoRecord, photo_id

    t0 = time.perf_counter()
    summary = IngestSummary()
    hashed: dict[str, tuple[PhotoFile, str]] = {}  # point id -> (file, sha256); first file wins
    copies: dict[str, list[PhotoFile]] = {}  # point id -> later files with the same bytes in this batch
    for item in files:
        try:
            digest = hash_file(item.path)
        except OSError as exc:
            summary.failures.append(IngestFailure(str(item.path), f"cannot read: {exc.strerror or exc}"))
            continue
        pid = photo_id(digest)
        if pid in hashed:
            copies.setdefault(pid, []).append(item)
        else:
            hashed[pid] = (item, digest)

    present = gallery.store.existing_ids(gallery.collection, list(hashed))
    summary.already_present += len(present)
    todo = [(pid, item, digest) for pid, (item, digest) in hashed.items() if pid not in present]
    failed: set[str] = set()  # point ids whose first file could not be decoded
    if todo:
        result = gallery.embedder.embed_photo_files([item.path for _, item, _ in todo], batch_size=len(todo))
        by_path = {item.path: (pid, item, digest) for pid, item, digest in todo}
        for failure in result.failures:
            # the decoder's messages start with the path, which the failure already carries
            reason = failure.reason.removeprefix(f"{failure.path}: ")
            summary.failures.append(IngestFailure(str(failure.path), reason))
            failed.add(by_path[failure.path][0])
        now = datetime.now(UTC).isoformat(timespec="seconds")
        records = []
        for path, (width, height) in zip(result.paths, result.sizes, strict=True):
            pid, item, digest = by_path[path]  # sizes are the files' own (EXIF-rotated), not the draft decode's
            records.append(PhotoRecord(pid, str(item.path), item.category, digest, width, height, now))
        gallery.store.upsert_photos(gallery.collection, records, result.vectors)
        summary.added += len(records)
    for pid, later in copies.items():
        # the same bytes twice in one batch: stored once, or failed alike (the same bytes decode alike)
        if pid in failed:
            first = hashed[pid][0].path
            reason = f"the same bytes as {first}, which failed"
            summary.failures.extend(IngestFailure(str(i.path), reason) for i in later)
        else:
            summary.already_present += len(later)
    summary.seconds = time.perf_counter() - t0
    return summary


def split_batches(files: Sequence[PhotoFile], batch_size: int) -> list[list[PhotoFile]]:
    return [list(files[i : i + batch_size]) for i in range(0, len(files), batch_size)]


def ingest_files(
    gallery: Gallery,
    files: Sequence[PhotoFile],
    batch_size: int,
    on_batch: Callable[[int, IngestSummary], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IngestSummary:
    """Ingest files batch by batch; on_batch(index, batch summary) after each one is stored, so an interrupted
    run loses at most the batch in flight. should_stop() is checked between batches."""
    total = IngestSummary()
    for index, batch in enumerate(split_batches(files, batch_size)):
        if should_stop and should_stop():
            break
        summary = ingest_batch(gallery, batch)
        total.merge(summary)
        if on_batch:
            on_batch(index, summary)
    return total
