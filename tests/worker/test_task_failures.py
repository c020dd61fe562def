"""Every way an ingestion batch can fail ends in its job record, so a job never stays RUNNING forever.

The task runs for real: eagerly in this process (`apply`, the same function the worker calls) or in a real
`sketchsearch worker`, against the real Redis of the worker tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from services.config import Settings, get_settings
from services.errors import BrokerUnavailableError, JobStoreError, StoreLockedError
from services.ingest import PhotoFile
from services.jobs import Job, JobState, JobStore, RedisJobStore, create_celery_app, follow_job, new_job
from services.vector_store import open_store
from tests.services.gallery_support import cli_env, start_cli, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FOLLOW_TIMEOUT_S = 120.0  # a regression (a job left RUNNING) fails the test instead of hanging it


def _follow(jobs: RedisJobStore, job_id: str) -> Job:
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    job = follow_job(jobs, job_id, poll_s=0.05, until=lambda _: time.monotonic() > deadline)
    assert job.finished, f"job still {job.state.value} after {FOLLOW_TIMEOUT_S:.0f} s: {job.to_json()}"
    return job


def _photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "photo.png"
    Image.new("RGB", (64, 48), (200, 60, 30)).save(path)
    return path


@pytest.fixture
def jobs(redis_url: str, queue: str) -> Iterator[RedisJobStore]:
    store = RedisJobStore(redis_url)  # `queue` removes the jobs created meanwhile
    yield store
    store.close()


def _job(jobs: RedisJobStore, files: list[PhotoFile]) -> Job:
    job, _ = new_job(files, 8, "celery", None)
    jobs.create_job(job)
    return job


@pytest.fixture
def tasks(
    tmp_path: Path, tiny_model: Path, redis_url: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """worker.tasks in this process, its settings those of a worker on the test queue, its runtime closed."""
    for key, value in {
        "HOME": str(tmp_path / "home"),
        "MODEL": str(tiny_model),
        "BROKER_URL": redis_url,
        "QUEUE": queue,
        "VISIBILITY_TIMEOUT": "1",  # keeps the pause before a requeue short
    }.items():
        monkeypatch.setenv(f"SKETCHSEARCH_{key}", value)
    get_settings.cache_clear()
    from worker import tasks as module

    module.close_runtime()
    yield module
    module.close_runtime()
    get_settings.cache_clear()


def test_an_unexpected_exception_is_recorded_and_the_job_fails(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path
) -> None:
    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    # a message of another version of the sender: [path] without its category, a plain ValueError
    result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo)]]])
    assert result.successful()  # recorded, so the message is acknowledged rather than retried forever
    final = _follow(jobs, job.id)
    assert final.state == JobState.FAILED
    assert len(final.errors()) == 1 and "batch 0: ValueError:" in final.errors()[0], final.errors()


def test_a_runtime_that_cannot_start_is_recorded_with_a_job_store_from_the_settings(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path
) -> None:
    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    holder = open_store(Settings(home=tmp_path / "home"))  # this process owns the embedded store already
    try:
        result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo), "x"]]])
    finally:
        holder.close()
    assert result.successful()
    final = _follow(jobs, job.id)
    assert final.state == JobState.FAILED
    assert "SKETCHSEARCH_QDRANT_URL" in final.errors()[0], final.errors()  # the lock's message, with its fix


def test_a_failure_that_cannot_be_recorded_is_handed_back_a_bounded_number_of_times(
    tasks: ModuleType,
    jobs: RedisJobStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from celery.exceptions import Reject, Retry

    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", "redis://127.0.0.1:1/0")  # Redis gone while the batch runs
    get_settings.cache_clear()
    # an eager task runs each retry at once (Celery's apply follows them), so the whole budget runs here
    result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo), "x"]]])
    handed_back = [r for r in caplog.records if "cannot record its outcome" in r.getMessage()]
    # handed back (a retry carrying its count), not raised, while the budget lasts: Celery acknowledges a
    # task that raised, losing the batch; once spent, raised (logged, acknowledged), neither retried nor
    # requeued again: a Redis that keeps failing the records cannot bring the batch back forever
    assert len(handed_back) == tasks._MAX_UNRECORDED
    assert result.state == "FAILURE", (result.state, result.result)
    assert isinstance(result.result, BrokerUnavailableError)
    assert not isinstance(result.result, Reject | Retry)
    assert any("giving the batch up" in r.getMessage() for r in caplog.records)
    assert jobs.get_job(job.id).reports == {}  # nothing recorded: running the ingestion again redoes it


def test_a_retry_that_cannot_be_published_requeues_after_a_pause(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import Reject

    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()

    def unpublishable(*_: object, **__: object) -> None:
        # what Task.retry raises when it cannot publish; the only stand-in here: an eager task never publishes,
        # and a broker cannot be made to fail between a delivery and its retry on demand
        raise Reject("broker down", requeue=False)

    monkeypatch.setattr(tasks.ingest_batch_task, "retry", unpublishable)
    started = time.monotonic()
    result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo), "x"]]])
    assert result.state == "REJECTED", (result.state, result.result)
    assert isinstance(result.result, Reject) and result.result.requeue
    assert time.monotonic() - started >= 0.5  # the pause: half the visibility timeout of 1 s


def test_a_job_record_redis_refuses_for_good_is_not_requeued(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path
) -> None:
    from celery.exceptions import Reject, Retry

    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    key = f"sketchsearch:job:{job.id}"
    jobs.client.delete(key)
    jobs.client.set(key, "not a hash")  # every HSET/HINCRBY on it now fails with WRONGTYPE, forever
    result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo), "x"]]])
    # nothing can be recorded, and handing the batch back would bring it back every few seconds forever
    assert result.state == "FAILURE", (result.state, result.result)
    assert isinstance(result.result, JobStoreError) and "WRONGTYPE" in str(result.result)
    assert not isinstance(result.result, Reject | Retry)


@pytest.fixture
def restricted_broker_url(redis_url: str) -> Iterator[str]:
    """A Redis user that may do everything but HINCRBY (which marks a batch started): a permanent refusal of
    one command, while the failure record (HSET) still goes through."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    user, password = f"sketchsearch-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    try:
        admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                          commands=["+@all", "-hincrby"])
    except redis.ResponseError as exc:
        admin.close()
        pytest.skip(f"this Redis has no ACL users ({exc})")
    try:
        yield redis_url.replace("redis://", f"redis://{user}:{password}@")
    finally:
        admin.acl_deluser(user)
        admin.close()


def test_a_command_redis_refuses_for_good_is_recorded_not_retried(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path, restricted_broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", restricted_broker_url)
    get_settings.cache_clear()
    result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo), "x"]]])
    assert result.successful(), (result.state, result.result)  # recorded, acknowledged: not back in 5 s
    final = _follow(jobs, job.id)
    assert final.state == JobState.FAILED
    assert "NoPermissionError" in final.errors()[0] and "retrying will not help" in final.errors()[0], final.errors()
    assert restricted_broker_url.split("@")[0].split(":")[-1] not in final.errors()[0]  # the password masked


def test_a_collection_deleted_under_the_worker_is_recorded_and_made_again(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path
) -> None:
    photo = _photo(tmp_path / "photos")
    first, gone, again = (_job(jobs, [PhotoFile(photo, "x")]) for _ in range(3))
    assert tasks.ingest_batch_task.apply(args=[first.id, 0, [[str(photo), "x"]]]).successful()
    runtime = tasks.get_runtime()
    runtime.gallery.store.client.delete_collection(runtime.gallery.collection)  # someone deletes it
    assert tasks.ingest_batch_task.apply(args=[gone.id, 0, [[str(photo), "x"]]]).successful()
    failed = _follow(jobs, gone.id)
    assert failed.state == JobState.FAILED and "ingest photos" in failed.errors()[0], failed.errors()
    # not retried as if the store were down, and the next batch does not fail the same way: it starts afresh
    assert tasks.ingest_batch_task.apply(args=[again.id, 0, [[str(photo), "x"]]]).successful()
    done = _follow(jobs, again.id)
    assert done.state == JobState.DONE and done.summary().added == 1, done.to_json()


@pytest.fixture
def named_broker(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], int]]:
    """The worker's broker URL with a client name of its own; yields how many connections carry that name."""
    import redis

    name = f"sketchsearch-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", f"{redis_url}?client_name={name}")
    get_settings.cache_clear()
    admin = redis.Redis.from_url(redis_url)
    yield lambda: sum(1 for client in admin.client_list() if client["name"] == name)
    admin.close()


def test_the_runtime_closes_its_job_store(tasks: ModuleType, named_broker: Callable[[], int]) -> None:
    jobs = tasks.get_runtime().jobs
    assert isinstance(jobs, RedisJobStore)
    jobs.ping()
    assert named_broker() == 1
    tasks.close_runtime()
    assert named_broker() == 0  # the worker's shutdown lets go of Redis too


def test_a_runtime_that_cannot_start_closes_the_job_store_it_opened(
    tasks: ModuleType, named_broker: Callable[[], int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = tasks.open_job_store

    def connected_at_once(settings: Settings) -> JobStore:
        # the real store, connected at once: opening one does not connect, so a leak would not show
        store = real_open(settings)
        assert isinstance(store, RedisJobStore)
        store.ping()
        return store

    monkeypatch.setattr(tasks, "open_job_store", connected_at_once)
    holder = open_store(Settings(home=tmp_path / "home"))  # the embedded store is taken: open_store fails
    try:
        with pytest.raises(StoreLockedError):
            tasks.get_runtime()
    finally:
        holder.close()
    assert named_broker() == 0


def test_the_retry_countdown_stays_below_the_visibility_timeout() -> None:
    from worker.tasks import retry_countdown

    assert [retry_countdown(n, 600) for n in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    for visibility_timeout in (1, 3, 10, 100):
        assert all(0 <= retry_countdown(n, visibility_timeout) < visibility_timeout for n in range(10))


def test_a_real_worker_records_a_batch_that_raised_and_goes_on(
    tmp_path: Path, redis_url: str, queue: str, tiny_model: Path, jobs: RedisJobStore
) -> None:
    photo = _photo(tmp_path / "photos" / "red")
    env = cli_env(home=str(tmp_path / "home"), model=str(tiny_model), broker_url=redis_url, queue=queue)
    settings = Settings(home=tmp_path / "home", broker_url=redis_url, queue=queue)
    broken = _job(jobs, [PhotoFile(photo, "red")])
    good = _job(jobs, [PhotoFile(photo, "red")])
    app = create_celery_app(settings)
    try:
        app.send_task("sketchsearch.ingest_batch", args=[broken.id, 0, [[str(photo)]]], queue=queue)
        app.send_task("sketchsearch.ingest_batch", args=[good.id, 0, [[str(photo), "red"]]], queue=queue)
    finally:
        app.close()
    log = tmp_path / "worker.log"
    worker = start_cli(["worker"], env, log)
    try:
        failed = _follow(jobs, broken.id)
        done = _follow(jobs, good.id)  # the worker survived the batch that raised
    finally:
        assert stop_process(worker) == 0, log.read_text()
    assert failed.state == JobState.FAILED and "ValueError" in failed.errors()[0], failed.to_json()
    assert done.state == JobState.DONE and done.summary().added == 1, done.to_json()
    assert "Traceback" in log.read_text()  # an unexpected error is logged with where it came from
