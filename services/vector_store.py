"""The vector store: photo embeddings in Qdrant, one collection per model, embedded or on a server."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from encoder.neighbours import NeighbourIndex, blend_neighbours
from services.config import Settings, mask_url
from services.errors import (
    CollectionExistsError,
    ConfigError,
    DimensionMismatchError,
    GalleryNotFoundError,
    PhotoNotFoundError,
    StoreLockedError,
    StoreUnavailableError,
)

logger = logging.getLogger(__name__)

GALLERY_ALIAS = "gallery"
COLLECTION_PREFIX = "photos"
_LOCK_MESSAGE = "already accessed by another instance"
# How local mode words a missing collection and a name that is taken: plain ValueErrors, which it also raises
# for wrong arguments (a vector of the wrong dimension), so only these two are recognised by their text.
_LOCAL_MISSING = re.compile(r"Collection (?P<name>\S+) not found")
_LOCAL_EXISTS = re.compile(r"(?:Collection|Alias) (?P<name>\S+) already exists")
# and how a server words a missing collection (404 alone could be a wrong URL path)
_SERVER_MISSING = re.compile(r"Collection `(?P<name>[^`]+)` doesn't exist")
# SQLite's primary result codes for a file that is damaged or not a database at all
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_INGEST_HINT = "ingest photos with `sketchsearch ingest PATH`"
# Reads by id are chunked so that one request stays small whatever the batch size.
_RETRIEVE_CHUNK = 256
# Each point holds two vectors: the photo's own embedding, and the gallery vector that searches rank by (the
# embedding blended with its nearest photos' embeddings, encoder/neighbours.py).
PHOTO_VECTOR = "photo"
GALLERY_VECTOR = "gallery"
# Payload key: the cosine of a photo's k-th nearest other photo. A new photo at or above it enters that photo's
# neighbours, so its gallery vector must be blended again; below it, nothing changes.
FLOOR_KEY = "neighbour_floor"
_NO_FLOOR = -2.0  # fewer than k other photos yet: any new photo is a neighbour
# A new photo looks for the photos whose neighbours it joins among its own (k + 1) x _REACH nearest: a photo
# farther than that from it but with it among its own k nearest (a hub) is missed, and keeps a slightly stale
# blend until it is blended again (docs/PLATFORM.md).
_REACH = 4


def collection_name(model_id: str, dim: int, neighbours: int) -> str:
    """The collection of one model: its id, dimension and gallery-neighbour count in the name, so that models
    (and gallery vectors blended differently) never share a collection."""
    return f"{COLLECTION_PREFIX}-{model_id}-d{dim}-n{neighbours}"


def photo_id(sha256_hex: str) -> str:
    """The point id of a photo: a UUID made of the first 16 bytes of its SHA-256, so that the same bytes map
    to the same point whatever the file's path."""
    return str(uuid.UUID(bytes=bytes.fromhex(sha256_hex)[:16]))


@dataclass(frozen=True)
class PhotoRecord:
    """A stored photo's payload and id."""

    id: str
    path: str
    category: str
    sha256: str
    width: int
    height: int
    ingested_at: str

    def payload(self) -> dict[str, Any]:
        data = asdict(self)
        del data["id"]
        return data

    @classmethod
    def from_point(cls, point_id: Any, payload: dict[str, Any] | None) -> PhotoRecord:
        data = payload or {}
        return cls(
            id=str(point_id),
            path=str(data.get("path", "")),
            category=str(data.get("category", "")),
            sha256=str(data.get("sha256", "")),
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
            ingested_at=str(data.get("ingested_at", "")),
        )


@dataclass(frozen=True)
class SearchHit:
    """One search result, best first in a list."""

    id: str
    path: str
    score: float
    category: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "score": self.score, "category": self.category}


def _sqlite_damaged(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file itself is damaged, as opposed to unreadable for now (locked, a failing
    disk, missing permissions): only then is moving the store aside the fix."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _damaged_advice(location: str) -> str:
    return (
        f"the embedded store at {location} is damaged: move the folder aside and ingest again "
        "(it holds vectors and paths, not the photo files themselves)"
    )


def _missing_collection(what: str, name: str, location: str) -> GalleryNotFoundError:
    return GalleryNotFoundError(
        f"{what}: collection {name} is not in the vector store at {location} (deleted meanwhile?): "
        f"{_INGEST_HINT} again to build it"
    )


@contextmanager
def _translated(what: str, location: str) -> Iterator[None]:
    """Turn qdrant-client and transport exceptions into our errors, once, at the boundary: what may pass with
    time (an unreachable server, an error answer, a failing disk) is StoreUnavailableError, which the worker
    retries; a missing collection is GalleryNotFoundError and a taken name CollectionExistsError, which waiting
    does not change. Other ValueErrors are wrong arguments (a bug) and propagate as they are. Messages are
    masked: a server URL, and the errors that quote it, may carry an API key."""
    try:
        yield
    except (ResponseHandlingException, ConnectionError, TimeoutError) as exc:
        raise StoreUnavailableError(
            mask_url(f"{what}: cannot reach the vector store at {location} ({exc})")
        ) from exc
    except UnexpectedResponse as exc:
        content = exc.content.decode("utf-8", "replace")
        if exc.status_code == 404 and (missing := _SERVER_MISSING.search(content)):
            raise _missing_collection(what, missing["name"], location) from exc
        if exc.status_code == 409 or "already exists" in content:
            raise CollectionExistsError(mask_url(f"{what}: the vector store at {location} answered {exc}")) from exc
        raise StoreUnavailableError(mask_url(f"{what}: the vector store at {location} answered {exc}")) from exc
    except sqlite3.Error as exc:  # local mode's storage: a full disk, a locked or damaged file
        if _sqlite_damaged(exc):
            raise StoreUnavailableError(f"{what}: {_damaged_advice(location)} ({exc})") from exc
        raise StoreUnavailableError(f"{what}: the embedded store at {location} failed ({exc})") from exc
    except ValueError as exc:
        text = str(exc)
        if missing := _LOCAL_MISSING.fullmatch(text):
            raise _missing_collection(what, missing["name"], location) from exc
        if _LOCAL_EXISTS.fullmatch(text):
            raise CollectionExistsError(f"{what}: {text} in the vector store at {location}") from exc
        raise


class VectorStore:
    """A Qdrant client with the operations the gallery needs. Open with open_store(); close when done."""

    def __init__(
        self,
        client: QdrantClient,
        location: str,
        embedded: bool,
        owner: _OwnerLock | None = None,
        neighbours: int = 0,
    ) -> None:
        self.client = client
        self.location = location
        self.embedded = embedded
        self.neighbours = neighbours  # k of the gallery vectors: each photo blended with its k nearest photos
        self._indexes: dict[str, NeighbourIndex] = {}  # embedded mode: each written collection's embeddings
        self._owner = owner
        # local mode keeps numpy arrays that an upsert resizes: a search from another thread must not
        # run in the middle of it (a server serialises for us, the lock then costs next to nothing)
        self._lock = threading.RLock()

    @contextmanager
    def _op(self, what: str) -> Iterator[None]:
        with self._lock, _translated(what, self.location), warnings.catch_warnings():
            # local mode warns on every write past 20k points; docs/PLATFORM.md says when to use a server
            warnings.filterwarnings("ignore", message="Local mode is not recommended", category=UserWarning)
            yield

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the store (in embedded mode: the folder lock, so another process may open it)."""
        try:
            self.client.close()
        finally:
            if self._owner is not None:
                self._owner.release()
                self._owner = None

    def speed_up_local_writes(self) -> None:
        """Embedded mode only. qdrant-client's local mode commits one SQLite transaction per point, each
        with an fsync: about 18 ms a point here, a ceiling of ~55 photos/s whatever the model. WAL with
        synchronous=NORMAL keeps every commit atomic and intact when the process is killed; only a power cut
        can lose the last commits, and the next ingest re-adds exactly those (photos are skipped by id).
        This reaches into qdrant-client's private objects, so a changed layout only costs speed."""
        if not self.embedded:
            return
        try:
            collections = self.client._client.collections  # type: ignore[attr-defined]
            for name, collection in collections.items():
                storage = getattr(collection, "storage", None)
                conn = getattr(storage, "storage", None)
                if isinstance(conn, sqlite3.Connection):
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")
                else:
                    logger.debug("collection %s: no SQLite storage found, writes stay synchronous", name)
        except (AttributeError, sqlite3.Error) as exc:
            logger.warning("could not switch the embedded store to WAL (ingestion will be slower): %s", exc)

    # --- collections -------------------------------------------------------------------------------------

    def collection_name(self, model_id: str, dim: int) -> str:
        return collection_name(model_id, dim, self.neighbours)

    def collection_dimension(self, name: str) -> int | None:
        """The vector size of a collection, None when it does not exist; -1 for a layout we never create."""
        with self._op(f"collection {name}"):
            if not self.client.collection_exists(name):
                return None
            params = self.client.get_collection(name).config.params.vectors
        if isinstance(params, dict) and set(params) == {PHOTO_VECTOR, GALLERY_VECTOR}:
            sizes = {int(p.size) for p in params.values()}
            if len(sizes) == 1:
                return sizes.pop()
        return -1  # one unnamed vector, or other names: not ours

    def check_dimension(self, name: str, size: int, dim: int, model_id: str) -> None:
        if size != dim:
            found = (
                f"vectors of another layout (not the {PHOTO_VECTOR}/{GALLERY_VECTOR} pair sketchsearch writes)"
                if size < 0
                else f"{size}-dimensional vectors"
            )
            raise DimensionMismatchError(
                f"collection {name} holds {found} but model {model_id} embeds {dim} dimensions; "
                "it will not be written into. Use the model that built it (SKETCHSEARCH_MODEL) or delete "
                f"the collection and ingest again (embedded store: remove {self.location})"
            )

    def ensure_collection(self, model_id: str, dim: int) -> str:
        """Create (or check) the model's collection, index category where supported, point `gallery` at it."""
        name = self.collection_name(model_id, dim)
        size = self.collection_dimension(name)
        if size is not None:
            self.check_dimension(name, size, dim, model_id)
        else:
            try:
                with self._op(f"create collection {name}"):
                    params = models.VectorParams(size=dim, distance=models.Distance.COSINE)
                    self.client.create_collection(
                        name, vectors_config={PHOTO_VECTOR: params, GALLERY_VECTOR: params}
                    )
            except (CollectionExistsError, StoreUnavailableError):
                # several workers starting on an empty server race to create it: the losers get a conflict,
                # and the collection the winner made is just as good. A create that timed out or failed in
                # transit may have been applied all the same, so it is checked the same way.
                size = self.collection_dimension(name)
                if size is None:
                    raise
                self.check_dimension(name, size, dim, model_id)
                logger.info("collection %s was created by another process meanwhile", name)
            else:
                logger.info("created collection %s (%d dimensions, cosine)", name, dim)
            if not self.embedded:
                # local mode has no payload indexes (qdrant-client warns and ignores them); a server uses this
                # one for category filters and for the category counts (facets). Creating it again is harmless.
                with self._op(f"index {name}"):
                    self.client.create_payload_index(name, "category", models.PayloadSchemaType.KEYWORD)
            self.speed_up_local_writes()
        try:
            self._point_alias(name)
        except (CollectionExistsError, StoreUnavailableError):
            # the same race on the alias: fine if it now points here, an error if another model took it
            if self.alias_target(GALLERY_ALIAS) != name:
                raise
        return name

    def find_collection(self, model_id: str, dim: int) -> str:
        """The model's existing collection for reading; GalleryNotFoundError or DimensionMismatchError."""
        name = self.collection_name(model_id, dim)
        size = self.collection_dimension(name)
        if size is not None:
            self.check_dimension(name, size, dim, model_id)
            return name
        target = self.alias_target(GALLERY_ALIAS)
        hint = _INGEST_HINT
        if target is not None:
            target_size = self.collection_dimension(target)
            same_model = f"{COLLECTION_PREFIX}-{model_id}-d{dim}"
            if target_size == -1 or target == same_model:
                raise GalleryNotFoundError(
                    f"the gallery ({GALLERY_ALIAS} -> {target}) was built before photos had gallery vectors, or by "
                    f"another tool: {hint} again to build {name} (the old collection is left as it is)"
                )
            if target.startswith(f"{same_model}-n"):
                raise GalleryNotFoundError(
                    f"the gallery ({GALLERY_ALIAS} -> {target}) was built with another "
                    f"SKETCHSEARCH_GALLERY_NEIGHBOURS ({target.rsplit('-n', 1)[1]}, now {self.neighbours}): set it "
                    f"back, or {hint} again to build {name}"
                )
            if target_size is not None and target_size != dim:
                raise DimensionMismatchError(
                    f"the gallery ({GALLERY_ALIAS} -> {target}) holds {target_size}-dimensional vectors but "
                    f"the active model {model_id} embeds {dim}: set SKETCHSEARCH_MODEL to the model that "
                    f"built it, or {hint} to build this model's collection"
                )
            raise GalleryNotFoundError(
                f"no photos for model {model_id} yet (the gallery alias points to {target}, another model): "
                f"set SKETCHSEARCH_MODEL to that model, or {hint}"
            )
        raise GalleryNotFoundError(f"the gallery is empty for model {model_id}: {hint}")

    def alias_target(self, alias: str) -> str | None:
        with self._op(f"alias {alias}"):
            for item in self.client.get_aliases().aliases:
                if item.alias_name == alias:
                    return str(item.collection_name)
        return None

    def _point_alias(self, name: str) -> None:
        current = self.alias_target(GALLERY_ALIAS)
        if current == name:
            return
        ops: list[Any] = []
        if current is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=GALLERY_ALIAS)))
        ops.append(
            models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=name, alias_name=GALLERY_ALIAS))
        )
        with self._op(f"alias {GALLERY_ALIAS}"):
            self.client.update_collection_aliases(change_aliases_operations=ops)
        logger.info("alias %s -> %s (was %s)", GALLERY_ALIAS, name, current)

    def list_collections(self) -> list[str]:
        with self._op("list collections"):
            return sorted(c.name for c in self.client.get_collections().collections)

    # --- points ------------------------------------------------------------------------------------------

    def existing_ids(self, collection: str, ids: Sequence[str]) -> set[str]:
        """The subset of ids already stored (no vectors transferred). On a server with gallery neighbours, a
        photo counts once it has been blended (it has a floor): a batch whose worker died between writing and
        blending is then done again, not skipped with its gallery vectors unblended."""
        found: set[str] = set()
        blended_only = self.neighbours > 0 and not self.embedded
        with self._op(f"read {collection}"):
            for start in range(0, len(ids), _RETRIEVE_CHUNK):
                chunk = list(ids[start : start + _RETRIEVE_CHUNK])
                points = self.client.retrieve(
                    collection, chunk, with_payload=[FLOOR_KEY] if blended_only else False, with_vectors=False
                )
                found.update(str(p.id) for p in points if not blended_only or FLOOR_KEY in (p.payload or {}))
        return found

    def upsert_photos(self, collection: str, records: Sequence[PhotoRecord], vectors: np.ndarray) -> None:
        """Write photos with their gallery vectors, and blend again the photos whose nearest neighbours they
        became. The same id overwrites, so a batch done twice stores each photo once."""
        if not records:
            return
        if vectors.shape != (len(records), vectors.shape[1]):
            raise ValueError(f"{len(records)} records but vectors of shape {vectors.shape}")
        ids = [r.id for r in records]
        rows = np.asarray(vectors, dtype=np.float32)
        with self._lock:  # the in-memory index and the store change together
            try:
                self._write_photos(collection, records, ids, rows)
            except BaseException:
                # the index may be ahead of the store: read it again (and mend what was left stale) next time
                self._indexes.pop(collection, None)
                raise

    def _write_photos(self, collection: str, records: Sequence[PhotoRecord], ids: list[str], rows: np.ndarray) -> None:
        gallery = rows
        others: tuple[list[str], np.ndarray] = ([], rows[:0])
        if self.neighbours > 0 and self.embedded:
            # the one owner of an embedded store sees every write: its in-memory index is exact and fast
            changed, blended = self._neighbour_index(collection).add(ids, rows)
            at = {pid: i for i, pid in enumerate(changed)}
            gallery = blended[[at[pid] for pid in ids]]
            written = set(ids)
            rest = [i for i, pid in enumerate(changed) if pid not in written]
            others = ([changed[i] for i in rest], blended[rest])
        with self._op(f"write {collection}"):
            self.client.upsert(
                collection,
                points=models.Batch(
                    ids=list[Any](ids),
                    vectors={PHOTO_VECTOR: rows.tolist(), GALLERY_VECTOR: gallery.tolist()},
                    payloads=[r.payload() for r in records],
                ),
                wait=True,
            )
        if self.embedded:
            if others[0]:
                self._write_gallery_vectors(collection, *others)
        elif self.neighbours > 0:
            self._blend_by_queries(collection, ids)

    def _write_gallery_vectors(self, collection: str, ids: Sequence[str], vectors: np.ndarray) -> None:
        with self._op(f"write {collection}"):
            self.client.update_vectors(
                collection,
                points=[
                    models.PointVectors(id=pid, vector={GALLERY_VECTOR: v.tolist()})
                    for pid, v in zip(ids, vectors, strict=True)
                ],
                wait=True,
            )

    def _neighbour_index(self, collection: str) -> NeighbourIndex:
        """The collection's photo embeddings in memory (read once per process). Reading also checks every
        stored gallery vector against the exact blend and rewrites those that differ: a process killed
        between writing a batch and blending its neighbours leaves them stale, and this mends them."""
        index = self._indexes.get(collection)
        if index is None:
            index, _ = self._read_and_mend(collection)
            self._indexes[collection] = index
        return index

    def reblend(self, collection: str) -> tuple[int, int]:
        """Blend every gallery vector of the collection again, exactly, from the stored embeddings, and rewrite
        those that differ; on a server also every photo's floor. This mends what a server's query-by-query
        blending can miss (a photo that a new photo joins among its nearest, but beyond the new photo's reach)
        and what a killed writer left. It reads the whole collection into this process. Returns (gallery
        vectors rewritten, photos)."""
        if self.neighbours <= 0:
            return 0, self.count_photos(collection)
        with self._lock:
            self._indexes.pop(collection, None)
            index, stale = self._read_and_mend(collection)
            if self.embedded:
                self._indexes[collection] = index
        return stale, len(index.ids)

    def _read_and_mend(self, collection: str) -> tuple[NeighbourIndex, int]:
        """Every photo of the collection blended at once; stored gallery vectors that differ from that blend are
        rewritten (and, on a server, floors that differ from the exact ones). Returns the index and how many
        gallery vectors were rewritten."""
        dim = self.collection_dimension(collection) or 0
        ids: list[str] = []
        photos: list[np.ndarray] = []
        stored: list[np.ndarray] = []
        floors: list[float] = []
        offset: Any = None
        with self._op(f"read {collection}"):
            while True:
                points, offset = self.client.scroll(
                    collection, limit=1024, offset=offset, with_payload=False if self.embedded else [FLOOR_KEY],
                    with_vectors=True,
                )
                ids.extend(str(p.id) for p in points)
                floors.extend(float((p.payload or {}).get(FLOOR_KEY, np.nan)) for p in points)
                for rows, name in ((photos, PHOTO_VECTOR), (stored, GALLERY_VECTOR)):
                    page = [_named(p.vector, name) for p in points]
                    rows.append(np.asarray(page, dtype=np.float32).reshape(len(points), dim))
                if offset is None:
                    break
        index = NeighbourIndex(self.neighbours, dim)
        if not ids:
            return index, 0
        t0 = time.perf_counter()
        _, blended = index.add(ids, np.concatenate(photos))
        stale = np.flatnonzero(np.abs(blended - np.concatenate(stored)).max(axis=1) > 1e-4)
        logger.info("%s: %d photos read and blended in %.1f s", collection, len(ids), time.perf_counter() - t0)
        if len(stale):
            logger.warning("%s: %d gallery vectors were stale, blended again", collection, len(stale))
            self._write_gallery_vectors(collection, [ids[i] for i in stale], blended[stale])
        if not self.embedded:
            exact = np.where(np.isinf(index.floors), _NO_FLOOR, index.floors)
            # NaN (no floor: written but never blended) differs from every exact floor
            moved = np.flatnonzero(~(np.abs(exact - np.asarray(floors)) <= 1e-6))
            self._write_floors(collection, [ids[i] for i in moved], exact[moved])
        return index, len(stale)

    def _write_floors(self, collection: str, ids: Sequence[str], floors: np.ndarray) -> None:
        with self._op(f"write {collection}"):
            for start in range(0, len(ids), _RETRIEVE_CHUNK):
                operations: list[Any] = [
                    _floor_operation(i, float(f))
                    for i, f in zip(ids[start : start + _RETRIEVE_CHUNK], floors[start : start + _RETRIEVE_CHUNK],
                                    strict=True)
                ]
                self.client.batch_update_points(collection, update_operations=operations, wait=True)

    def _blend_by_queries(self, collection: str, new_ids: Sequence[str]) -> int:
        """A server's way to bring the gallery vectors up to date after new_ids were written (several workers
        may write, so no process holds the whole gallery): blend each new photo with its k nearest photos, and
        blend again every photo that a new one joins among its k nearest, as its payload floor says. Returns
        how many gallery vectors were written."""
        k = self.neighbours
        if k <= 0 or not new_ids:
            return 0
        affected = dict.fromkeys(str(i) for i in new_ids)
        with self._op(f"blend {collection}"):
            for start in range(0, len(new_ids), _RETRIEVE_CHUNK):
                own = self.client.retrieve(
                    collection, list(new_ids[start : start + _RETRIEVE_CHUNK]), with_vectors=[PHOTO_VECTOR]
                )
                requests = [
                    models.QueryRequest(
                        query=_named(p.vector, PHOTO_VECTOR),
                        using=PHOTO_VECTOR,
                        limit=(k + 1) * _REACH,
                        with_payload=[FLOOR_KEY],
                    )
                    for p in own
                ]
                for response in self.client.query_batch_points(collection, requests):
                    for hit in response.points:
                        floor = (hit.payload or {}).get(FLOOR_KEY)
                        if floor is None or hit.score >= float(floor):
                            affected.setdefault(str(hit.id))
            ids = list(affected)
            for start in range(0, len(ids), _RETRIEVE_CHUNK):
                self._blend_points(collection, ids[start : start + _RETRIEVE_CHUNK], k)
        logger.debug("%s: %d new photos, %d gallery vectors blended", collection, len(new_ids), len(ids))
        return len(ids)

    def _blend_points(self, collection: str, ids: Sequence[str], k: int) -> None:
        points = self.client.retrieve(collection, list(ids), with_payload=False, with_vectors=[PHOTO_VECTOR])
        requests = [
            models.QueryRequest(
                query=_named(p.vector, PHOTO_VECTOR), using=PHOTO_VECTOR, limit=k + 1, with_vector=[PHOTO_VECTOR]
            )
            for p in points
        ]
        responses = self.client.query_batch_points(collection, requests) if requests else []
        updates: list[Any] = []
        for point, response in zip(points, responses, strict=True):
            own = np.asarray(_named(point.vector, PHOTO_VECTOR), dtype=np.float32)
            others = [h for h in response.points if str(h.id) != str(point.id)][:k]
            near = np.asarray([_named(h.vector, PHOTO_VECTOR) for h in others], dtype=np.float32)
            scores = np.asarray([[h.score for h in others]], dtype=np.float32)
            blended = blend_neighbours(own[None], near.reshape(1, len(others), own.shape[0]), scores)[0]
            floor = float(others[-1].score) if len(others) == k else _NO_FLOOR
            # only this point's gallery vector and floor: a concurrent write of its payload is kept
            updates.append(
                models.UpdateVectorsOperation(
                    update_vectors=models.UpdateVectors(
                        points=[models.PointVectors(id=point.id, vector={GALLERY_VECTOR: blended.tolist()})]
                    )
                )
            )
            updates.append(_floor_operation(point.id, floor))
        if updates:
            self.client.batch_update_points(collection, update_operations=updates, wait=True)

    def read_vectors(self, collection: str, ids: Sequence[str], which: str = GALLERY_VECTOR) -> np.ndarray:
        """Stored vectors (PHOTO_VECTOR: the embeddings, GALLERY_VECTOR: what search ranks by), in the order of
        ids; a missing id is an error."""
        rows: dict[str, list[float]] = {}
        with self._op(f"read {collection}"):
            for start in range(0, len(ids), _RETRIEVE_CHUNK):
                chunk = list(ids[start : start + _RETRIEVE_CHUNK])
                for p in self.client.retrieve(collection, chunk, with_vectors=[which]):
                    rows[str(p.id)] = _named(p.vector, which)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise PhotoNotFoundError(f"{len(missing)} ids not in {collection}, e.g. {missing[0]}")
        return np.asarray([rows[i] for i in ids], dtype=np.float32)

    def get_photo(self, collection: str, point_id: str) -> PhotoRecord | None:
        with self._op(f"read {collection}"):
            points = self.client.retrieve(collection, [point_id], with_payload=True, with_vectors=False)
        return PhotoRecord.from_point(points[0].id, points[0].payload) if points else None

    def search(
        self,
        collection: str,
        query: np.ndarray | str,
        limit: int,
        score_threshold: float | None = None,
        category: str | None = None,
    ) -> list[SearchHit]:
        """Nearest photos to a vector, or to a stored photo given its id (the photo itself excluded)."""
        flt = None
        if category is not None:
            flt = models.Filter(must=[models.FieldCondition(key="category", match=models.MatchValue(value=category))])
        q: Any = query if isinstance(query, str) else np.asarray(query, dtype=np.float32).tolist()
        with self._op(f"search {collection}"):
            result = self.client.query_points(
                collection,
                query=q,
                using=GALLERY_VECTOR,
                # a stored photo queries with its own embedding, as a sketch does, against the gallery vectors
                lookup_from=models.LookupLocation(collection=collection, vector=PHOTO_VECTOR)
                if isinstance(query, str)
                else None,
                limit=limit,
                score_threshold=score_threshold,
                query_filter=flt,
                with_payload=["path", "category"],
                with_vectors=False,
            )
        return [
            SearchHit(
                id=str(p.id),
                path=str((p.payload or {}).get("path", "")),
                score=float(p.score),
                category=str((p.payload or {}).get("category", "")),
            )
            for p in result.points
        ]

    def count_photos(self, collection: str) -> int:
        with self._op(f"count {collection}"):
            return int(self.client.count(collection, exact=True).count)

    def count_categories(self, collection: str) -> dict[str, int]:
        """Photos per category, most first (a facet over the category payload)."""
        with self._op(f"count {collection}"):
            total = self.client.count(collection, exact=True).count
            if total == 0:
                return {}
            response = self.client.facet(collection, key="category", limit=max(total, 1), exact=True)
        return {str(hit.value): int(hit.count) for hit in response.hits}


def _floor_operation(point_id: Any, floor: float) -> models.SetPayloadOperation:
    """Set one point's floor and nothing else of its payload (a concurrent write of the rest is kept)."""
    return models.SetPayloadOperation(set_payload=models.SetPayload(payload={FLOOR_KEY: floor}, points=[point_id]))


def _named(vector: Any, name: str) -> list[float]:
    """One named vector of a point as qdrant-client returns it."""
    if not isinstance(vector, dict) or name not in vector:
        raise StoreUnavailableError(f"the vector store returned no {name!r} vector for a point")
    return list(vector[name])


class _OwnerLock:
    """The embedded store's owner: an exclusive advisory lock on HOME/store.owner, which also says who holds
    it. Taken before qdrant-client opens the folder, because qdrant-client reads the whole store into memory
    before it checks its own lock: a second process is refused at once, having read nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: TextIO | None = None

    def acquire(self) -> bool:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        if program == "__main__.py":  # python -m <package>
            program = f"python -m {Path(sys.argv[0]).parent.name}"
        record = {
            "pid": os.getpid(),
            "command": " ".join([program, *sys.argv[1:3]]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record))
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            # emptied while still held, so the next owner's record is never overwritten
            self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def describe_holder(self) -> str:
        try:
            record = json.loads(self.path.read_text())
            return f"process {int(record['pid'])} ({record.get('command', '?')}, since {record.get('since', '?')})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"


def _locked_error(path: Path, holder: str) -> StoreLockedError:
    return StoreLockedError(
        f"the embedded store at {path.resolve()} is in use by {holder}; only one process may open it. Stop "
        "that process, or run a Qdrant server and set SKETCHSEARCH_QDRANT_URL (for example "
        "http://localhost:6333) so that several processes can share the gallery"
    )


def open_store(settings: Settings) -> VectorStore:
    """Open the configured store: the Qdrant server at QDRANT_URL, or the embedded store under HOME, which
    only one process may hold (StoreLockedError otherwise)."""
    if settings.qdrant_url:
        url = settings.qdrant_url
        shown = mask_url(url)  # the URL may carry the API key (https://key@host, ?api_key=): never printed
        # no version check: it is a request at construction that warns instead of failing; the
        # list_collections() below is the check that matters (reachable, and answering)
        try:
            client = QdrantClient(url=url, api_key=settings.qdrant_api_key, timeout=30, check_compatibility=False)
        except ValueError as exc:  # urllib3's LocationParseError, or a scheme qdrant-client does not know
            raise ConfigError(mask_url(f"SKETCHSEARCH_QDRANT_URL={url} is not a usable URL ({exc})")) from exc
        # location is what messages and logs show, so it is the masked URL; the client keeps the real one
        store = VectorStore(client, shown, embedded=False, neighbours=settings.gallery_neighbours)
        try:
            store.list_collections()  # the client connects lazily: fail here, with the fix, not mid-ingest
        except StoreUnavailableError as exc:
            client.close()
            raise StoreUnavailableError(
                f"{exc}. Start the Qdrant server, or unset SKETCHSEARCH_QDRANT_URL to use the embedded store"
            ) from exc
        return store

    path = settings.store_path
    path.mkdir(parents=True, exist_ok=True)
    owner = _OwnerLock(settings.home / "store.owner")
    if not owner.acquire():
        raise _locked_error(path, owner.describe_holder())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "local mode is not recommended beyond 20k points" warning
            client = QdrantClient(path=str(path))
    except RuntimeError as exc:
        owner.release()
        if _LOCK_MESSAGE not in str(exc):
            raise StoreUnavailableError(f"cannot open the embedded store at {path}: {exc}") from exc
        # a program other than sketchsearch opened the folder with qdrant-client
        raise _locked_error(path, "another program using qdrant-client") from exc
    except sqlite3.Error as exc:
        owner.release()
        if _sqlite_damaged(exc):
            raise StoreUnavailableError(f"{_damaged_advice(str(path))} ({exc})") from exc
        # unreadable for now (locked by another program, a failing disk, permissions, a file that is not
        # a file): moving the store aside would hide the photos stored so far for nothing
        raise StoreUnavailableError(f"cannot open the embedded store at {path}: {exc}") from exc
    except (ValueError, OSError) as exc:
        owner.release()
        raise StoreUnavailableError(f"cannot open the embedded store at {path}: {exc}") from exc
    except BaseException:
        owner.release()
        raise
    store = VectorStore(
        client, str(path.resolve()), embedded=True, owner=owner, neighbours=settings.gallery_neighbours
    )
    store.speed_up_local_writes()
    return store
