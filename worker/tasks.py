"""Celery tasks and the per-process runtime they share (the model and the vector store, opened once)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import worker_shutdown

from encoder.errors import SketchSearchError
from services.config import Settings, get_settings
from services.errors import StoreLockedError, StoreUnavailableError
from services.gallery import Gallery, load_active_model, open_gallery
from services.ingest import IngestSummary, PhotoFile
from services.jobs import (
    INGEST_TASK,
    BatchReport,
    JobStore,
    create_celery_app,
    open_job_store,
    run_ingest_task,
)
from services.vector_store import open_store

logger = logging.getLogger(__name__)

app = create_celery_app(get_settings())

# Transient store errors (a Qdrant server restarting) are retried with a growing delay, then recorded.
_MAX_RETRIES = 5


@dataclass
class WorkerRuntime:
    """What every task of this process uses: loaded once, kept until the worker stops."""

    settings: Settings
    gallery: Gallery
    jobs: JobStore


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """Load the model and open the store on first use. In embedded mode this process becomes the store's
    only owner until it exits (StoreLockedError if another process holds it)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            settings = get_settings()
            jobs = open_job_store(settings)
            store = open_store(settings)  # first: a locked store fails before seconds of model loading
            try:
                embedder = load_active_model(settings)
                gallery = open_gallery(store, embedder, create=True)
            except BaseException:
                store.close()
                raise
            _runtime = WorkerRuntime(settings, gallery, jobs)
            logger.info(
                "worker ready: model %s, collection %s, store %s",
                embedder.model_id,
                gallery.collection,
                store.location,
            )
        return _runtime


def close_runtime() -> None:
    """Release the store (the embedded lock) so the next process can open it."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.gallery.store.close()
            _runtime = None


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    close_runtime()


@app.task(name=INGEST_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=_MAX_RETRIES)
def ingest_batch_task(self: Any, job_id: str, index: int, files: list[list[str]]) -> None:
    """Ingest one batch of a job: [[path, category], ...]. Idempotent, so a redelivered batch is harmless."""
    runtime = get_runtime()
    batch = [PhotoFile(Path(path), category) for path, category in files]
    try:
        run_ingest_task(runtime.gallery, runtime.jobs, job_id, index, batch)
    except StoreUnavailableError as exc:
        if isinstance(exc, StoreLockedError) or self.request.retries >= _MAX_RETRIES:
            _record_error(runtime.jobs, job_id, index, exc)
            return
        logger.warning("job %s batch %d: %s; retrying", job_id, index, exc)
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from exc
    except SketchSearchError as exc:
        # permanent (a dimension mismatch, a missing model): record it, acknowledge, do not loop on it
        _record_error(runtime.jobs, job_id, index, exc)


def _record_error(jobs: JobStore, job_id: str, index: int, exc: Exception) -> None:
    logger.error("job %s batch %d failed: %s", job_id, index, exc)
    jobs.record_batch(job_id, BatchReport(index, IngestSummary(), error=str(exc)))
