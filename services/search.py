"""Search: a sketch (or a stored photo) in, the nearest photos of the active model's collection out."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder.preprocess import ImageSource
from services.errors import InvalidQueryError, PhotoNotFoundError
from services.gallery import Gallery, ModelIdentity
from services.ingest import hash_file
from services.vector_store import SearchHit, VectorStore, photo_id

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 10

__all__ = ["SearchHit", "StoreStats", "find_similar", "read_stats", "search_sketch"]


@dataclass(frozen=True)
class StoreStats:
    """What the active model's collection holds."""

    photos: int
    model: str
    collection: str
    categories: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "photos": self.photos,
            "model": self.model,
            "collection": self.collection,
            "categories": self.categories,
        }


def _limits(top_k: int | None, threshold: float | None, max_hits: int) -> tuple[int, float | None]:
    """Top-k (default) or every hit at or above a threshold (at most max_hits); never both."""
    if top_k is not None and threshold is not None:
        raise InvalidQueryError("give either top_k or threshold, not both")
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise InvalidQueryError(f"threshold {threshold} is not a cosine similarity in [-1, 1]")
        return max_hits, threshold
    k = DEFAULT_TOP_K if top_k is None else top_k
    if k < 1:
        raise InvalidQueryError(f"top_k must be at least 1, not {k}")
    return k, None


def search_sketch(
    gallery: Gallery,
    sketch: ImageSource,
    top_k: int | None = None,
    threshold: float | None = None,
    category: str | None = None,
    max_hits: int = 1000,
) -> list[SearchHit]:
    """Photos nearest to a sketch, best first; EmptySketchError or InvalidImageError for a bad sketch."""
    limit, score_threshold = _limits(top_k, threshold, max_hits)
    vector = gallery.embedder.embed_sketch(sketch)
    return gallery.store.search(gallery.collection, vector, limit, score_threshold, category)


def resolve_photo_id(photo: str) -> str:
    """A photo id as stored, or a file whose bytes give it."""
    path = Path(photo)
    if path.is_file():
        try:
            return photo_id(hash_file(path))
        except OSError as exc:
            raise PhotoNotFoundError(f"cannot read {photo}: {exc.strerror or exc}") from exc
    return photo


def find_similar(
    gallery: Gallery,
    photo: str,
    top_k: int | None = None,
    threshold: float | None = None,
    category: str | None = None,
    max_hits: int = 1000,
) -> list[SearchHit]:
    """Photos nearest to a stored photo (given by id or by file), the photo itself excluded."""
    limit, score_threshold = _limits(top_k, threshold, max_hits)
    point_id = resolve_photo_id(photo)
    try:
        point_id = str(uuid.UUID(point_id))
    except ValueError as exc:
        raise PhotoNotFoundError(f"{photo} is neither a photo id (a UUID) nor a photo file") from exc
    if gallery.store.get_photo(gallery.collection, point_id) is None:
        raise PhotoNotFoundError(
            f"no photo {photo} in {gallery.collection} (ingest it first, or give a stored id)"
        )
    hits = gallery.store.search(gallery.collection, point_id, limit + 1, score_threshold, category)
    return [h for h in hits if h.id != point_id][:limit]


def read_stats(store: VectorStore, model: ModelIdentity) -> StoreStats:
    """Photo and category counts of the model's collection (zero before the first ingest)."""
    name = store.collection_name(model.model_id, model.dim)
    size = store.collection_dimension(name)
    if size is None:
        return StoreStats(0, model.model_id, name, {})
    store.check_dimension(name, size, model.dim, model.model_id)
    return StoreStats(store.count_photos(name), model.model_id, name, store.count_categories(name))
