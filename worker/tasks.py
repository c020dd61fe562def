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
from services.errors import (
    BrokerUnavailableError,
    GalleryNotFoundError,
    JobStoreError,
    StoreLockedError,
    StoreUnavailableError,
)
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
# A batch whose outcome cannot be recorded (Redis unreachable) is handed back this many times, with the same
# growing delay, before it is given up: about six minutes with the default visibility timeout.
_MAX_UNRECORDED = 10
# When even handing the batch back with a retry fails (the broker is down), it is requeued after this pause (at
# most), so a broker that stays down is not hammered by the same batch in a tight loop.
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
            try:
                store = open_store(settings)  # first: a locked store fails before seconds of model loading
                try:
                    embedder = load_active_model(settings)
                    gallery = open_gallery(store, embedder, create=True)
                except BaseException:
                    store.close()
                    raise
            except BaseException:
                jobs.close()  # each failed start would otherwise leave a connection pool behind
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
    """Release the store (the embedded lock) so the next process can open it, and the job store's
    connections."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            runtime, _runtime = _runtime, None
            try:
                runtime.gallery.store.close()
            finally:
                runtime.jobs.close()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    close_runtime()


@app.task(name=INGEST_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def ingest_batch_task(self: Any, job_id: str, index: int, files: list[list[str]], unrecorded: int = 0) -> None:
    """Ingest one batch of a job: [[path, category], ...]. Idempotent, so a redelivered batch is harmless.

    Every way a batch can fail ends in a recorded BatchReport: with acks_late Celery acknowledges a task that
    raised, so a failure left unrecorded would leave its job RUNNING forever (and `ingest --wait` with it).
    The exceptions: a Redis that cannot take the record, for now (the batch is handed back, at most
    _MAX_UNRECORDED times) or for good (a JobStoreError: raised, so logged and acknowledged, never requeued).

    `unrecorded` (never sent by the enqueuer) counts the times this batch was handed back because its outcome
    could not be recorded. It travels in the message because Redis, where anything else would be counted, is
    what failed. Celery's own request.retries counts every retry of the message, so the retries spent on an
    unavailable vector store are the difference: each cause has its own budget (hence max_retries=None: the
    budgets below decide, not Celery)."""
    runtime: WorkerRuntime | None = None
    try:
        runtime = get_runtime()  # inside: a store or model that cannot be opened is this batch's failure too
        batch = [PhotoFile(Path(path), category) for path, category in files]
        run_ingest_task(runtime.gallery, runtime.jobs, job_id, index, batch)
    except StoreUnavailableError as exc:
        store_retries = max(0, self.request.retries - unrecorded)
        if isinstance(exc, StoreLockedError) or store_retries >= _MAX_RETRIES:
            _record_error(self, runtime, job_id, index, exc, unrecorded)
            return
        settings = runtime.settings if runtime else get_settings()
        countdown = retry_countdown(store_retries, settings.visibility_timeout)
        logger.warning("job %s batch %d: %s; retrying in %.1f s", job_id, index, exc, countdown)
        _hand_back(self, settings, job_id, index, exc, countdown, unrecorded)
    except BrokerUnavailableError as exc:
        # the job record (Redis) could not be written: nothing to record it in, and Redis is usually back soon
        _retry_unrecorded(self, runtime, job_id, index, exc, unrecorded)
    except GalleryNotFoundError as exc:
        # the collection was deleted under this worker: record it, and drop the runtime so that the next batch
        # (an ingestion run again, as the message says) opens the gallery afresh and creates the collection
        try:
            _record_error(self, runtime, job_id, index, exc, unrecorded)
        finally:
            close_runtime()
    except SketchSearchError as exc:
        # permanent (a dimension mismatch, a missing model, a command Redis refuses for good: JobStoreError):
        # record it, acknowledge, do not loop on it
        _record_error(self, runtime, job_id, index, exc, unrecorded)
    except Exception as exc:
        # not ours (a bug, an onnxruntime or sqlite error, a malformed message): the same, with the traceback
        logger.exception("job %s batch %d failed unexpectedly", job_id, index)
        _record_error(self, runtime, job_id, index, exc, unrecorded)


def _record_error(
    task: Any, runtime: WorkerRuntime | None, job_id: str, index: int, exc: Exception, unrecorded: int
) -> None:
    """Write the batch's failure into its job record, with the runtime's job store or, when the runtime could
    not be built, one opened from the settings.

    When Redis cannot take the record for now, the batch is handed back instead of raising (see
    _retry_unrecorded): Celery acknowledges a task that raised (acks_late acknowledges failures too), which
    would lose both the batch and the news of its failure. A JobStoreError (Redis refuses for good)
    propagates: nothing can be recorded, and retrying would loop."""
    error = describe_error(exc)
    logger.error("job %s batch %d failed: %s", job_id, index, error)
    jobs: JobStore | None = None
    try:
        jobs = runtime.jobs if runtime else open_job_store(get_settings())
        jobs.record_batch(job_id, BatchReport(index, IngestSummary(), error=error))
    except BrokerUnavailableError as record_exc:
        _retry_unrecorded(task, runtime, job_id, index, record_exc, unrecorded)
    except JobStoreError:
        # Redis refuses the record for good (a key of the wrong type, no permission, no memory): handing the
        # batch back would only loop. Raised, so the worker logs it and Celery acknowledges it (acks_late
        # acknowledges failures): the batch is dropped and its job does not finish
        logger.error("job %s batch %d: its failure cannot be recorded either; the batch is dropped", job_id, index)
        raise
    finally:
        if jobs is not None and runtime is None:
            jobs.close()  # opened for this one record


def _retry_unrecorded(
    task: Any, runtime: WorkerRuntime | None, job_id: str, index: int, exc: BrokerUnavailableError, unrecorded: int
) -> NoReturn:
    """Hand back a batch whose outcome could not be recorded, counting it in the message; after
    _MAX_UNRECORDED times give it up (raise: logged, acknowledged), so that a Redis that keeps failing the
    records while still serving the queue cannot keep one batch coming back forever."""
    settings = runtime.settings if runtime else get_settings()
    if unrecorded >= _MAX_UNRECORDED:
        logger.error(
            "job %s batch %d: its outcome could not be recorded %d times (%s); giving the batch up, the job "
            "will not finish: run the same ingestion again once Redis works (stored photos are skipped)",
            job_id, index, unrecorded + 1, exc,
        )
        raise exc
    countdown = retry_countdown(unrecorded, settings.visibility_timeout)
    logger.error("job %s batch %d: cannot record its outcome (%s); handed back, again in %.1f s",
                 job_id, index, exc, countdown)
    _hand_back(task, settings, job_id, index, exc, countdown, unrecorded + 1)


def _hand_back(
    task: Any, settings: Settings, job_id: str, index: int, exc: Exception, countdown: float, unrecorded: int
) -> NoReturn:
    """Retry the batch after `countdown` seconds with `unrecorded` in its message. When the retry cannot be
    published (the broker is down) Celery would drop the message: requeue it instead, after a pause, so that
    a broker that flaps is not hit by the same batch in a tight loop.

    That requeue cannot carry a count (Redis puts the same message back), and needs no cap: it only happens
    when publishing failed, so the broker is most likely down and the requeue fails too. The message then
    stays unacknowledged in Redis, which hands it out again once visibility_timeout has passed: one attempt
    per visibility timeout while Redis is down, and nothing could be recorded meanwhile anyway."""
    try:
        raise task.retry(exc=exc, countdown=countdown, kwargs={"unrecorded": unrecorded}) from exc
    except Reject as rejected:
        logger.error("job %s batch %d: cannot schedule the retry (%s); requeued", job_id, index, rejected.reason)
        time.sleep(min(_REQUEUE_PAUSE_S, settings.visibility_timeout / 2))
        raise Reject(rejected.reason, requeue=True) from exc
