"""Every way an ingestion batch can fail ends in its job record, so a job never stays RUNNING forever.

The task runs for real: eagerly in this process (`apply`, the same function the worker calls) or in a real
`sketchsearch worker`, against the real Redis of the worker tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from services.config import Settings, get_settings
from services.ingest import PhotoFile
from services.jobs import Job, JobState, RedisJobStore, create_celery_app, follow_job, new_job
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


def test_a_failure_that_cannot_be_recorded_puts_the_batch_back(
    tasks: ModuleType, jobs: RedisJobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import Reject

    photo = _photo(tmp_path / "photos")
    job = _job(jobs, [PhotoFile(photo, "x")])
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", "redis://127.0.0.1:1/0")  # Redis gone while the batch runs
    get_settings.cache_clear()
    result = tasks.ingest_batch_task.apply(args=[job.id, 0, [[str(photo), "x"]]])
    # requeued (Reject with requeue), not raised: Celery acknowledges a task that raised, losing the batch
    assert result.state == "REJECTED", (result.state, result.result)
    assert isinstance(result.result, Reject) and result.result.requeue
    assert jobs.get_job(job.id).reports == {}  # nothing recorded: the batch is redone when Redis is back


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
