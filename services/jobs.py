"""Jobs: ingestion split into batches, run by Celery workers (BROKER_URL set) or by background threads of the
process that owns the embedded store, with records that any process can read to follow progress."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from encoder.errors import SketchSearchError
from services.config import Settings, mask_url
from services.errors import (
    BrokerUnavailableError,
    ConfigError,
    JobNotFoundError,
    JobRecordError,
    JobStoreError,
)
from services.ingest import IngestFailure, IngestSummary, PhotoFile, ingest_batch, split_batches

if TYPE_CHECKING:
    from services.gallery import Gallery

logger = logging.getLogger(__name__)

INGEST_TASK = "sketchsearch.ingest_batch"
_REDIS_PREFIX = "sketchsearch:job:"
_REDIS_INDEX = "sketchsearch:jobs"
_RECORD_TTL_S = 30 * 24 * 3600
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Redis replies that say "not now" (a failed snapshot, a busy script) and have no class in redis-py
_TRANSIENT_REPLY = re.compile(r"(?:^|caused error: )(?:MISCONF|BUSY) ")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass
class BatchReport:
    """The outcome of one batch; written when it completes (again if it is redelivered: same index)."""

    index: int
    summary: IngestSummary
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "summary": self.summary.to_json(), "error": self.error}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchReport:
        return cls(int(data["index"]), IngestSummary.from_json(data["summary"]), data.get("error"))


@dataclass
class Job:
    """An ingestion job: its batches, which ones started (and how often) and what each one did."""

    id: str
    created_at: float
    batch_sizes: list[int]
    label: str | None = None
    runner: str = "local"  # local (threads of the store owner) or celery
    owner_pid: int | None = None  # the process running a local job
    rejected: list[IngestFailure] = field(default_factory=list)  # paths refused before any batch ran
    attempts: dict[int, int] = field(default_factory=dict)  # batch index -> deliveries started
    reports: dict[int, BatchReport] = field(default_factory=dict)
    cancelled: bool = False
    error: str | None = None  # a job-level error (enqueueing failed)

    @property
    def photos(self) -> int:
        return sum(self.batch_sizes)

    @property
    def batches(self) -> int:
        return len(self.batch_sizes)

    @property
    def done_photos(self) -> int:
        return sum(self.batch_sizes[i] for i in self.reports if i < len(self.batch_sizes))

    @property
    def state(self) -> JobState:
        if self.error or any(r.error for r in self.reports.values()):
            finished = len(self.reports) == self.batches
            return JobState.FAILED if finished or self.error else JobState.RUNNING
        if len(self.reports) == self.batches:
            return JobState.DONE
        if self.cancelled or (self.runner == "local" and self.owner_pid and not _pid_alive(self.owner_pid)):
            return JobState.INTERRUPTED
        return JobState.RUNNING if self.attempts else JobState.QUEUED

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.INTERRUPTED)

    def summary(self) -> IngestSummary:
        total = IngestSummary(failures=list(self.rejected))
        for index in sorted(self.reports):
            total.merge(self.reports[index].summary)
        return total

    def errors(self) -> list[str]:
        found = [f"batch {r.index}: {r.error}" for r in self.reports.values() if r.error]
        # masked again on the way out: records written before passwords were masked may still hold one
        return [mask_url(e) for e in ([self.error] if self.error else []) + found]

    def meta_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "batch_sizes": self.batch_sizes,
            "label": self.label,
            "runner": self.runner,
            "owner_pid": self.owner_pid,
            "rejected": [{"path": f.path, "reason": f.reason} for f in self.rejected],
            "cancelled": self.cancelled,
            "error": self.error,
        }

    def to_json(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            "id": self.id,
            "state": self.state.value,
            "created_at": self.created_at,
            "photos": self.photos,
            "done": self.done_photos,
            "batches": self.batches,
            "batches_done": len(self.reports),
            "added": summary.added,
            "already_present": summary.already_present,
            "failed": summary.to_json()["failed"],
            "redelivered": sum(max(0, n - 1) for n in self.attempts.values()),
            "errors": self.errors(),
            "label": self.label,
            "runner": self.runner,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Job:
        return cls(
            id=str(meta["id"]),
            created_at=float(meta["created_at"]),
            batch_sizes=[int(n) for n in meta["batch_sizes"]],
            label=meta.get("label"),
            runner=str(meta.get("runner", "local")),
            owner_pid=meta.get("owner_pid"),
            rejected=[IngestFailure(str(f["path"]), str(f["reason"])) for f in meta.get("rejected", [])],
            cancelled=bool(meta.get("cancelled", False)),
            error=meta.get("error"),
        )


def new_job(
    files: Sequence[PhotoFile],
    batch_size: int,
    runner: str,
    label: str | None,
    rejected: Sequence[IngestFailure] = (),
) -> tuple[Job, list[list[PhotoFile]]]:
    batches = split_batches(files, batch_size)
    job = Job(
        id=uuid.uuid4().hex[:12],
        created_at=time.time(),
        batch_sizes=[len(b) for b in batches],
        label=label,
        runner=runner,
        owner_pid=os.getpid() if runner == "local" else None,
        rejected=list(rejected),
    )
    return job, batches


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore(Protocol):
    """Where job records live: Redis next to the broker, or files under HOME."""

    def create_job(self, job: Job) -> None: ...
    def update_meta(self, job: Job) -> None: ...
    def mark_started(self, job_id: str, index: int) -> None: ...
    def record_batch(self, job_id: str, report: BatchReport) -> None: ...
    def get_job(self, job_id: str) -> Job: ...
    def list_jobs(self, limit: int = 20) -> list[Job]: ...
    def close(self) -> None: ...


class FileJobStore:
    """One JSON file per job under HOME/jobs; written only by the process that runs the job (the store
    owner), read by anyone. Files are replaced atomically, so a reader never sees half a record."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def _read(self, job_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self._path(job_id).read_text()))
        except FileNotFoundError as exc:
            raise JobNotFoundError(f"no job {job_id} in {self.folder}") from exc

    def _write(self, job_id: str, data: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(job_id).with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self._path(job_id))

    def close(self) -> None:
        """Nothing held open between writes; here so that every JobStore can be closed alike."""

    def create_job(self, job: Job) -> None:
        with self._lock:
            self._write(job.id, {"meta": job.meta_json(), "attempts": {}, "reports": {}})

    def update_meta(self, job: Job) -> None:
        with self._lock:
            data = self._read(job.id)
            data["meta"] = job.meta_json()
            self._write(job.id, data)

    def mark_started(self, job_id: str, index: int) -> None:
        with self._lock:
            data = self._read(job_id)
            data["attempts"][str(index)] = int(data["attempts"].get(str(index), 0)) + 1
            self._write(job_id, data)

    def record_batch(self, job_id: str, report: BatchReport) -> None:
        with self._lock:
            data = self._read(job_id)
            data["reports"][str(report.index)] = report.to_json()
            self._write(job_id, data)

    @staticmethod
    def _job(data: dict[str, Any]) -> Job:
        job = Job.from_meta(data["meta"])
        job.attempts = {int(k): int(v) for k, v in data.get("attempts", {}).items()}
        job.reports = {int(k): BatchReport.from_json(v) for k, v in data.get("reports", {}).items()}
        return job

    def get_job(self, job_id: str) -> Job:
        return self._job(self._read(job_id))

    def list_jobs(self, limit: int = 20) -> list[Job]:
        jobs = []
        for path in self.folder.glob("*.json") if self.folder.is_dir() else []:
            try:
                jobs.append(self._job(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("skipping unreadable job record %s: %s", path, exc)
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs[:limit]


class RedisJobStore:
    """Job records in the broker's Redis: a hash per job (meta, started:<i>, batch:<i>) and a time index.
    Redelivered batches overwrite their own field, so the counts never double."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        # A Redis that cannot be reached (or answered too late), or that cannot write for a while (a replica
        # during a failover: READONLY; out of memory: OOM; a failed snapshot: MISCONF), is worth waiting for: the
        # worker hands such a batch back to the queue, at most 10 times. A Redis that answers with an error of
        # the command itself (WRONGTYPE, NOPERM) or refuses the password answers the same way next time.
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._transient: tuple[type[BaseException], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.OutOfMemoryError,
            redis.exceptions.TryAgainError,
            redis.exceptions.ClusterDownError,  # MasterDownError among them
            OSError,
        )
        # replies redis-py has no class for: their code starts the message, or follows "caused error: " when a
        # pipeline annotated it (every write here is a pipeline)
        self._refused: tuple[type[BaseException], ...] = (
            # ConnectionErrors to redis-py, but a wrong password or a user without rights stays so
            redis.exceptions.AuthenticationError,
            redis.exceptions.AuthorizationError,
        )
        try:
            self.client = redis.Redis.from_url(
                url, socket_connect_timeout=3, socket_timeout=10, decode_responses=True
            )
        except (ValueError, TypeError) as exc:  # redis-py parses the URL here (a port that is not a number...)
            raise ConfigError(
                f"SKETCHSEARCH_BROKER_URL={mask_url(url)} is not a usable Redis URL ({mask_url(str(exc))}); "
                "expected redis://[:password@]host:port/db"
            ) from exc

    def close(self) -> None:
        """Release the connection pool (a CLI run or a test opens several stores)."""
        self.client.close()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._redis_errors as exc:
            passing = isinstance(exc, self._transient) or _TRANSIENT_REPLY.search(str(exc)) is not None
            if passing and not isinstance(exc, self._refused):
                raise BrokerUnavailableError(broker_hint(self.url, exc)) from exc
            raise JobStoreError(
                mask_url(
                    f"the job records in Redis at {self.url} refused the command ({type(exc).__name__}: {exc}); "
                    "retrying will not help: fix the Redis server or SKETCHSEARCH_BROKER_URL"
                )
            ) from exc

    def ping(self) -> None:
        with self._translated():
            self.client.ping()

    def create_job(self, job: Job) -> None:
        key = _REDIS_PREFIX + job.id
        with self._translated():
            pipe = self.client.pipeline()
            pipe.hset(key, "meta", json.dumps(job.meta_json()))
            pipe.expire(key, _RECORD_TTL_S)
            pipe.zadd(_REDIS_INDEX, {job.id: job.created_at})
            pipe.execute()

    # Every write refreshes the expiry in the same transaction: a write to a record that has just expired
    # recreates the hash, and without the expire it would then stay in Redis forever.

    def update_meta(self, job: Job) -> None:
        key = _REDIS_PREFIX + job.id
        with self._translated():
            pipe = self.client.pipeline()
            pipe.hset(key, "meta", json.dumps(job.meta_json()))
            pipe.expire(key, _RECORD_TTL_S)
            pipe.execute()

    def mark_started(self, job_id: str, index: int) -> None:
        key = _REDIS_PREFIX + job_id
        with self._translated():
            pipe = self.client.pipeline()
            pipe.hincrby(key, f"started:{index}", 1)
            pipe.expire(key, _RECORD_TTL_S)
            pipe.execute()

    def record_batch(self, job_id: str, report: BatchReport) -> None:
        key = _REDIS_PREFIX + job_id
        with self._translated():
            pipe = self.client.pipeline()
            pipe.hset(key, f"batch:{report.index}", json.dumps(report.to_json()))
            pipe.expire(key, _RECORD_TTL_S)
            pipe.execute()

    @staticmethod
    def _job(fields: dict[str, str]) -> Job:
        job = Job.from_meta(json.loads(fields["meta"]))
        for name, value in fields.items():
            kind, _, index = name.partition(":")
            if kind == "started":
                job.attempts[int(index)] = int(value)
            elif kind == "batch":
                job.reports[int(index)] = BatchReport.from_json(json.loads(value))
        return job

    def get_job(self, job_id: str) -> Job:
        with self._translated():
            fields = self.client.hgetall(_REDIS_PREFIX + job_id)
        if "meta" not in fields:
            raise JobNotFoundError(f"no job {job_id} in {mask_url(self.url)}")
        return self._job(fields)  # type: ignore[arg-type]

    def list_jobs(self, limit: int = 20) -> list[Job]:
        with self._translated():
            ids = [str(i) for i in self.client.zrevrange(_REDIS_INDEX, 0, limit - 1)]  # type: ignore[union-attr]
            pipe = self.client.pipeline()
            for job_id in ids:
                pipe.hgetall(_REDIS_PREFIX + job_id)
            rows = pipe.execute()
            expired = [job_id for job_id, fields in zip(ids, rows, strict=True) if "meta" not in fields]
            if expired:
                self.client.zrem(_REDIS_INDEX, *expired)
        return [self._job(fields) for fields in rows if "meta" in fields]


def broker_hint(url: str, exc: BaseException) -> str:
    """What to tell a person whose broker is down; the URL's password masked (the message gets printed)."""
    return mask_url(
        f"cannot reach the broker at {url} ({type(exc).__name__}: {exc}). Start Redis there, fix "
        "SKETCHSEARCH_BROKER_URL, or unset it to run ingestion in-process"
    )


def check_broker_url(url: str) -> None:
    if not url.startswith(_REDIS_SCHEMES):
        raise ConfigError(
            f"SKETCHSEARCH_BROKER_URL={mask_url(url)}: only Redis brokers are supported (redis://, rediss://, "
            "unix://); job records live next to the queue"
        )


def open_job_store(settings: Settings) -> JobStore:
    """Redis (the broker's) when BROKER_URL is set, else files under HOME/jobs."""
    if settings.broker_url:
        check_broker_url(settings.broker_url)
        return RedisJobStore(settings.broker_url)
    return FileJobStore(settings.jobs_path)


# --- Celery -------------------------------------------------------------------------------------------------


def create_celery_app(settings: Settings) -> Any:
    """The Celery app shared by the enqueuing CLI and the worker, so both agree on names and delivery rules.

    One task at a time per worker (solo pool, prefetch 1), acknowledged after it finishes (acks_late). A
    worker killed mid-batch never acknowledges: Redis hands the batch out again once it has been unacked
    for visibility_timeout seconds (that is how "requeue on worker loss" works with a solo pool), and the
    batch is redone idempotently (point ids come from the photo bytes)."""
    from celery import Celery

    if not settings.broker_url:
        raise ConfigError("SKETCHSEARCH_BROKER_URL is not set: Celery is only used with a broker")
    check_broker_url(settings.broker_url)
    vt = settings.visibility_timeout
    app = Celery("sketchsearch", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # progress lives in the job records; no result backend needed
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=settings.queue,
        task_routes={INGEST_TASK: {"queue": settings.queue}},
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": vt,
            # sweep for abandoned batches often enough that a short visibility timeout is honoured
            "unacked_restore_interval": max(1, min(10, vt // 2)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 3,
            "socket_timeout": 30,
        },
        broker_connection_timeout=3,
    )
    return app


def submit_celery_ingest(
    settings: Settings, files: Sequence[PhotoFile], label: str | None, rejected: Sequence[IngestFailure] = ()
) -> Job:
    """Record a job and send its batches (paths and categories, not pixels) to the queue. The sender never
    opens the vector store: in embedded mode the worker owns it."""
    if not settings.broker_url:
        raise ConfigError("SKETCHSEARCH_BROKER_URL is not set: nothing to send the batches to")
    check_broker_url(settings.broker_url)
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError

    # what a broker that is down or unreachable raises, depending on the moment: kombu's wrapper, redis-py's
    # errors or plain socket errors (ConnectionError is an OSError); anything else is a bug and propagates
    broker_errors = (KombuOperationalError, redis.RedisError, OSError)
    store = RedisJobStore(settings.broker_url)
    try:
        store.ping()  # fail with the fix before anything is recorded
        job, batches = new_job(files, settings.batch_size, "celery", label, rejected)
        store.create_job(job)
        app = create_celery_app(settings)
        sent = 0
        try:
            with app.connection_for_write() as conn:
                for index, batch in enumerate(batches):
                    app.send_task(
                        INGEST_TASK,
                        args=[job.id, index, [[str(f.path), f.category] for f in batch]],
                        queue=settings.queue,
                        connection=conn,
                        retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
                    )
                    sent += 1
        except Exception as exc:
            # the record must say the job will never finish, whatever stopped the sending
            job.error = mask_url(f"enqueueing stopped after {sent} of {len(batches)} batches: {exc}")
            try:
                store.update_meta(job)
            except (BrokerUnavailableError, JobStoreError) as record_exc:
                logger.warning("job %s: cannot record that enqueueing stopped: %s", job.id, record_exc)
            if isinstance(exc, broker_errors):
                raise BrokerUnavailableError(broker_hint(settings.broker_url, exc)) from exc
            raise
        finally:
            app.close()
    finally:
        store.close()
    logger.info("job %s: %d photos in %d batches sent to %s", job.id, job.photos, job.batches, settings.queue)
    return job


def run_ingest_task(
    gallery: Gallery, jobs: JobStore, job_id: str, index: int, files: Sequence[PhotoFile]
) -> None:
    """One batch of a job (the body of the Celery task and of a local job's loop)."""
    jobs.mark_started(job_id, index)
    summary = ingest_batch(gallery, files)
    jobs.record_batch(job_id, BatchReport(index, summary))


# --- in-process jobs (no broker) ---------------------------------------------------------------------------


class LocalJobRunner:
    """Runs ingestion jobs in a background thread of the process that owns the store, one job at a time;
    records go to the job store like Celery jobs, so following a job works the same way."""

    def __init__(self, gallery: Gallery, jobs: JobStore, batch_size: int) -> None:
        self.gallery = gallery
        self.jobs = jobs
        self.batch_size = batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sketchsearch-job")
        self._cancel: dict[str, threading.Event] = {}
        self._futures: dict[str, Future[None]] = {}

    def submit(
        self, files: Sequence[PhotoFile], label: str | None, rejected: Sequence[IngestFailure] = ()
    ) -> Job:
        job, batches = new_job(files, self.batch_size, "local", label, rejected)
        self.jobs.create_job(job)
        self._cancel[job.id] = threading.Event()
        self._futures[job.id] = self._pool.submit(self._run, job, batches)
        return job

    def _run(self, job: Job, batches: list[list[PhotoFile]]) -> None:
        try:
            self._run_batches(job, batches)
        except BaseException:
            # the record could not be written (a full disk, permissions): it will never say the job ended, so
            # the exception stays in the future for follow() and is logged here, never lost with the thread
            logger.exception("job %s stopped and its record could not say so", job.id)
            raise

    def _run_batches(self, job: Job, batches: list[list[PhotoFile]]) -> None:
        stop = self._cancel[job.id]
        for index, batch in enumerate(batches):
            if stop.is_set():
                job.cancelled = True
                self.jobs.update_meta(job)
                logger.info("job %s cancelled before batch %d", job.id, index)
                return
            try:
                run_ingest_task(self.gallery, self.jobs, job.id, index, batch)
            except Exception as exc:  # the record must say why the job stopped; the thread has no caller
                logger.exception("job %s batch %d failed", job.id, index)
                error = describe_error(exc)
                self.jobs.record_batch(job.id, BatchReport(index, IngestSummary(), error=error))
                job.error = f"stopped at batch {index}: {error}"
                self.jobs.update_meta(job)
                return

    def cancel(self, job_id: str) -> None:
        """Stop after the batch in flight; what is stored stays stored."""
        if job_id in self._cancel:
            self._cancel[job_id].set()

    def wait(self, job_id: str, timeout: float | None = None) -> None:
        """Block until the job's thread ends (TimeoutError after `timeout` s). What ended it without a record
        is raised as raise_if_failed does, a SketchSearchError with its fix, never the thread's raw exception
        (an OSError from a full disk would reach the user as a traceback)."""
        future = self._futures.get(job_id)
        if future is None:
            return
        future.exception(timeout=timeout)  # waits; the exception itself is raised below, translated
        self.raise_if_failed(job_id)

    def thread_done(self, job_id: str) -> bool:
        """Whether the job's thread has ended (normally or not); a job of another runner counts as ended."""
        future = self._futures.get(job_id)
        return future is None or future.done()

    def raise_if_failed(self, job_id: str) -> None:
        """Raise what ended the job's thread without a record saying so, as a SketchSearchError."""
        future = self._futures.get(job_id)
        if future is None or not future.done() or future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            return
        if isinstance(exc, SketchSearchError):
            raise exc
        raise JobRecordError(
            f"job {job_id} stopped and its record could not be written ({describe_error(exc)}); "
            "what was stored stays stored: fix the cause and run the same ingestion again"
        ) from exc

    def follow(
        self, job_id: str, on_update: Callable[[Job], None] | None = None, poll_s: float = 0.25
    ) -> Job:
        """follow_job for a job of this runner that also stops when the thread ends: a thread that died
        without finishing the record would otherwise leave the follower polling a job that never ends."""
        job = follow_job(self.jobs, job_id, on_update, poll_s, until=lambda _: self.thread_done(job_id))
        self.raise_if_failed(job_id)
        # the thread may have written its last report between that reading and the check
        return job if job.finished else self.jobs.get_job(job_id)

    def shutdown(self) -> None:
        for event in self._cancel.values():
            event.set()
        self._pool.shutdown(wait=True)


def describe_error(exc: BaseException) -> str:
    """An exception for a record or a message: ours as they are (they are written for people), others with
    their type (a bare "No space left on device" does not say where it came from); passwords masked."""
    text = str(exc) if isinstance(exc, SketchSearchError) else f"{type(exc).__name__}: {exc}"
    return mask_url(text)


def follow_job(
    jobs: JobStore,
    job_id: str,
    on_update: Callable[[Job], None] | None = None,
    poll_s: float = 0.25,
    until: Callable[[Job], bool] | None = None,
) -> Job:
    """Poll a job's record until it has finished (or `until` says so); on_update gets every reading."""
    while True:
        job = jobs.get_job(job_id)
        if on_update:
            on_update(job)
        if job.finished or (until and until(job)):
            return job
        time.sleep(poll_s)
