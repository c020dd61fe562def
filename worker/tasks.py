"""Celery tasks and the per-process runtime they share (the model and the vector store, opened once)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from celery.exceptions import Reject
from celery.signals import worker_shutdown

from encoder.errors import SketchSearchError
from services.config import Settings, get_settings
from services.errors import BrokerUnavailableError, StoreLockedError, StoreUnavailableError
from services.gallery import Gallery, load_active_model, open_gallery
from services.ingest import IngestSummary, PhotoFile
from services.jobs import (
    INGEST_TASK,
    BatchReport,
    JobStore,
    create_celery_app,
    describe_error,
    open_job_store,
    run_ingest_task,
)
from services.vector_store import open_store

logger = logging.getLogger(__name__)

app = create_celery_app(get_settings())

# Transient store errors (a Qdrant server restarting) are retried with a growing delay, then recorded.
_MAX_RETRIES = 5
_MAX_COUNTDOWN_S = 60.0
# A batch whose outcome cannot be recorded (Redis down) goes back to the queue after this pause (at most), so
# a broker that stays down is not hammered by the same batch in a tight loop.
_REQUEUE_PAUSE_S = 5.0


def retry_countdown(retries: int, visibility_timeout: float) -> float:
    """Seconds before retry number `retries` + 1: doubling, at most a minute, and at most half the visibility
    timeout. A retry waits in the worker unacknowledged until its ETA; one that waits past the visibility
    timeout is handed out again by Redis, so the batch would run twice and the retries multiply."""
    return max(0.0, min(_MAX_COUNTDOWN_S, 2.0 ** (retries + 1), visibility_timeout / 2))


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
    """Ingest one batch of a job: [[path, category], ...]. Idempotent, so a redelivered batch is harmless.

    Every way a batch can fail ends in a recorded BatchReport: with acks_late Celery acknowledges a task that
    raised, so a failure left unrecorded would leave its job RUNNING forever (and `ingest --wait` with it)."""
    runtime: WorkerRuntime | None = None
    try:
        runtime = get_runtime()  # inside: a store or model that cannot be opened is this batch's failure too
        batch = [PhotoFile(Path(path), category) for path, category in files]
        run_ingest_task(runtime.gallery, runtime.jobs, job_id, index, batch)
    except StoreUnavailableError as exc:
        if isinstance(exc, StoreLockedError) or self.request.retries >= _MAX_RETRIES:
            _record_error(runtime, job_id, index, exc)
            return
        settings = runtime.settings if runtime else get_settings()
        countdown = retry_countdown(self.request.retries, settings.visibility_timeout)
        logger.warning("job %s batch %d: %s; retrying in %.1f s", job_id, index, exc, countdown)
        try:
            raise self.retry(exc=exc, countdown=countdown) from exc
        except Reject as rejected:
            # Celery could not publish the retry (the broker is down) and would drop the message: put it
            # back instead; the batch is redone later, idempotently
            logger.error("job %s batch %d: cannot schedule the retry (%s); requeued", job_id, index, rejected.reason)
            raise Reject(rejected.reason, requeue=True) from exc
    except BrokerUnavailableError as exc:
        # the job record (Redis) could not be written: nothing to record it in, and Redis is usually back soon
        _requeue(runtime, job_id, index, exc)
    except SketchSearchError as exc:
        # permanent (a dimension mismatch, a missing model): record it, acknowledge, do not loop on it
        _record_error(runtime, job_id, index, exc)
    except Exception as exc:
        # not ours (a bug, an onnxruntime or sqlite error, a malformed message): the same, with the traceback
        logger.exception("job %s batch %d failed unexpectedly", job_id, index)
        _record_error(runtime, job_id, index, exc)


def _record_error(runtime: WorkerRuntime | None, job_id: str, index: int, exc: Exception) -> None:
    """Write the batch's failure into its job record, with the runtime's job store or, when the runtime could
    not be built, one opened from the settings.

    When Redis cannot take the record, the message is requeued (Reject with requeue) instead of raising:
    Celery acknowledges a task that raised (acks_late acknowledges failures too), which would lose both the
    batch and the news of its failure. With the broker down the requeue fails as well, and the message stays
    unacknowledged in Redis, which hands it out again after the visibility timeout: redelivered either way."""
    error = describe_error(exc)
    logger.error("job %s batch %d failed: %s", job_id, index, error)
    jobs: JobStore | None = None
    try:
        jobs = runtime.jobs if runtime else open_job_store(get_settings())
        jobs.record_batch(job_id, BatchReport(index, IngestSummary(), error=error))
    except BrokerUnavailableError as record_exc:
        _requeue(runtime, job_id, index, record_exc)
    finally:
        if jobs is not None and runtime is None:
            jobs.close()  # opened for this one record


def _requeue(runtime: WorkerRuntime | None, job_id: str, index: int, exc: BrokerUnavailableError) -> NoReturn:
    """Hand the batch back to the queue (see _record_error): after a pause, so that a broker that stays down
    is not hit by the same batch in a tight loop."""
    settings = runtime.settings if runtime else get_settings()
    logger.error("job %s batch %d: cannot record its outcome (%s); the batch goes back to the queue",
                 job_id, index, exc)
    time.sleep(min(_REQUEUE_PAUSE_S, settings.visibility_timeout / 2))
    raise Reject(exc, requeue=True) from exc
