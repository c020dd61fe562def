"""The gallery: the active model bound to its collection in the vector store."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from encoder.checkpoint import load_checkpoint
from encoder.embedder import Embedder, load_embedder
from services.config import Settings
from services.vector_store import VectorStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelIdentity:
    """What names a collection, known without building the inference runtime."""

    model_id: str
    dim: int


@dataclass
class Gallery:
    """The photos of one model: its embedder, the store and the collection its vectors live in."""

    store: VectorStore
    embedder: Embedder
    collection: str

    @property
    def model_id(self) -> str:
        return self.embedder.model_id


def load_active_model(settings: Settings) -> Embedder:
    """The configured model, its ONNX graphs cached under HOME so that a restart does not export again."""
    settings.model_cache_path.mkdir(parents=True, exist_ok=True)
    embedder = load_embedder(
        settings.model,
        backend=settings.backend,
        cache_dir=settings.model_cache_path,
        threads=settings.threads,
    )
    logger.info("model %s (%d dimensions, %s backend)", embedder.model_id, embedder.dim, embedder.backend)
    return embedder


def read_model_identity(settings: Settings) -> ModelIdentity:
    """The active model's id and dimension from its checkpoint alone (no inference session)."""
    ckpt = load_checkpoint(settings.model)
    return ModelIdentity(ckpt.model_id, ckpt.dim)


def open_gallery(store: VectorStore, embedder: Embedder, create: bool) -> Gallery:
    """Bind a model to its collection: create=True for writers (creates it, moves the `gallery` alias),
    False for readers (GalleryNotFoundError when there is none). A dimension mismatch is always refused."""
    if create:
        name = store.ensure_collection(embedder.model_id, embedder.dim)
    else:
        name = store.find_collection(embedder.model_id, embedder.dim)
    return Gallery(store=store, embedder=embedder, collection=name)
