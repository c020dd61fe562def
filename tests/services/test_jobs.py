"""Job records and the `ingest`/`jobs` commands around them: a local job whose record cannot be written ends
instead of being followed forever, passwords never reach a message, bad URLs and bad paths are clear errors,
and Redis records keep their expiry."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import services.cli
import services.jobs
from services.cli import app
from services.config import Settings, get_settings, mask_url
from services.errors import BrokerUnavailableError, ConfigError, JobRecordError, JobStoreError
from services.gallery import Gallery
from services.ingest import IngestSummary, PhotoFile, collect_photos
from services.jobs import (
    BatchReport,
    FileJobStore,
    Job,
    JobStore,
    LocalJobRunner,
    RedisJobStore,
    broker_hint,
    new_job,
)
from tests.services.gallery_support import write_bad_files

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/14"  # not the worker tests' database (15); the jobs made here are removed
SECRET = "s3cret-Pa55"


class DiskFullJobStore(FileJobStore):
    """Job records on a disk that fills up once the job has started: every batch report fails to be written.
    (The only stand-in of these tests: a full disk cannot be made on demand, let alone as root.)"""

    def record_batch(self, job_id: str, report: BatchReport) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self._path(job_id)))


# --- a local job whose record cannot be written -------------------------------------------------------------


@pytest.mark.timeout(120)  # the regression this guards against is a follower that never returns
@pytest.mark.parametrize("how", ["follow", "wait"])  # wait: what `ingest` does on Ctrl-C, after cancelling
def test_a_local_job_whose_record_cannot_be_written_ends_with_a_clear_error(
    gallery: Gallery, photos_dir: Path, settings: Settings, how: str
) -> None:
    runner = LocalJobRunner(gallery, DiskFullJobStore(settings.jobs_path), batch_size=8)
    files, _ = collect_photos([photos_dir])
    job = runner.submit(files, label=None)
    try:
        # the thread's raw OSError must not escape, and following must not poll for ever
        with pytest.raises(JobRecordError, match="No space left on device") as caught:
            runner.follow(job.id, poll_s=0.01) if how == "follow" else runner.wait(job.id)
    finally:
        runner.shutdown()
    assert isinstance(caught.value.__cause__, OSError)
    assert f"job {job.id} stopped" in str(caught.value) and "run the same ingestion again" in str(caught.value)


@pytest.mark.timeout(120)
def test_cli_ingest_stops_and_fails_when_the_job_record_cannot_be_written(
    settings: Settings, photos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services.jobs, "FileJobStore", DiskFullJobStore)  # the CLI builds its store by name
    result = CliRunner().invoke(app, ["ingest", str(photos_dir)])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.stderr and "run the same ingestion again" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.timeout(120)
def test_cli_ingest_interrupted_after_its_record_failed_prints_the_error_not_a_traceback(
    settings: Settings, photos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services.jobs, "FileJobStore", DiskFullJobStore)

    def interrupted(jobs: JobStore, job_id: str, queue_hint: str | None, runner: LocalJobRunner | None = None) -> Job:
        # Ctrl-C pressed once the job's thread has died (the only stand-in: a key press, which CliRunner cannot
        # deliver); waiting for the thread first makes the order certain
        assert runner is not None
        while not runner.thread_done(job_id):
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(services.cli, "_follow", interrupted)
    result = CliRunner().invoke(app, ["ingest", str(photos_dir)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.stderr and "run the same ingestion again" in result.stderr


def test_a_local_job_that_ends_normally_is_followed_to_its_last_report(
    gallery: Gallery, photos_dir: Path, settings: Settings
) -> None:
    runner = LocalJobRunner(gallery, FileJobStore(settings.jobs_path), batch_size=5)
    files, _ = collect_photos([photos_dir])
    job = runner.submit(files, label=None)
    final = runner.follow(job.id, poll_s=0.01)
    runner.shutdown()
    assert final.finished and (final.done_photos, final.summary().added) == (24, 24)


# --- passwords ----------------------------------------------------------------------------------------------


def test_mask_url_hides_every_form_of_password() -> None:
    cases = {
        f"redis://:{SECRET}@host:6379/0": "redis://:***@host:6379/0",
        f"rediss://alice:{SECRET}@host/1": "rediss://alice:***@host/1",
        f"redis://{SECRET}@host/0": "redis://***@host/0",  # redis-py takes a lone userinfo as the password
        f"redis://:p@ss{SECRET}@host/0": "redis://:***@host/0",  # an unescaped @ in the password
        f"redis://host:6379/0?password={SECRET}&db=2": "redis://host:6379/0?password=***&db=2",
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
        # Qdrant URLs: a key in the userinfo or the query string
        f"https://{SECRET}@qdrant.example:6333": "https://***@qdrant.example:6333",
        f"https://qdrant.example:6333/?api_key={SECRET}": "https://qdrant.example:6333/?api_key=***",
        f"https://qdrant.example/?apikey={SECRET}&x=1": "https://qdrant.example/?apikey=***&x=1",
        "(unset: jobs run in-process)": "(unset: jobs run in-process)",
    }
    for given, shown in cases.items():
        assert mask_url(given) == shown
        assert services.jobs.mask_url(given) == shown  # still importable from where it was first
    sentence = f"cannot reach redis://:{SECRET}@a:1/0 or http://bob:{SECRET}@b/x, then stop"
    assert mask_url(sentence) == "cannot reach redis://:***@a:1/0 or http://bob:***@b/x, then stop"


def test_no_message_shows_the_broker_password(tmp_path: Path) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:1/0"
    assert SECRET not in broker_hint(url, ConnectionError(f"refused by {url}"))
    store = RedisJobStore(url)
    with pytest.raises(BrokerUnavailableError) as caught:
        store.ping()
    store.close()
    assert SECRET not in str(caught.value) and "redis://:***@127.0.0.1:1/0" in str(caught.value)
    job = Job("j1", 0.0, [1], error=f"enqueueing stopped: cannot connect to {url}")
    job.reports[0] = BatchReport(0, IngestSummary(), error=f"lost {url}")  # records written before masking
    assert job.errors() and not any(SECRET in e for e in job.errors())
    assert SECRET not in json.dumps(job.to_json())


def test_cli_config_and_ingest_do_not_print_the_broker_password(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", f"redis://:{SECRET}@127.0.0.1:1/0")
    get_settings.cache_clear()
    runner = CliRunner()
    for args in (["config"], ["config", "--json"]):
        shown = runner.invoke(app, args)
        assert shown.exit_code == 0 and SECRET not in shown.output
        assert "redis://:***@127.0.0.1:1/0" in shown.output
    folder = tmp_path / "empty"
    folder.mkdir()
    for args in (["ingest", str(folder), "--wait"], ["jobs"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "cannot reach the broker at redis://:***@127.0.0.1:1/0" in result.stderr
        assert SECRET not in result.output


# --- a malformed broker URL ---------------------------------------------------------------------------------


def test_a_malformed_broker_url_is_a_config_error(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"SKETCHSEARCH_BROKER_URL=redis://127.0.0.1:abc/0 is not a usable"):
        RedisJobStore("redis://127.0.0.1:abc/0")
    with pytest.raises(ConfigError) as caught:
        RedisJobStore(f"redis://:{SECRET}@127.0.0.1:abc/0")
    assert SECRET not in str(caught.value)
    monkeypatch.setenv("SKETCHSEARCH_BROKER_URL", "redis://127.0.0.1:abc/0")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["jobs"])
    assert result.exit_code == 2 and "is not a usable Redis URL" in result.stderr, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- paths that cannot be ingested --------------------------------------------------------------------------


def _nothing_created(settings: Settings) -> bool:
    """No job record, no store, no model cache: the command stopped before any of them."""
    return not settings.home.exists() or not any(settings.home.iterdir())


def test_cli_ingest_of_a_path_that_does_not_exist_is_an_error_before_anything_else(
    settings: Settings, tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "nonexistent")])
    assert result.exit_code == 2, result.output
    assert f"no such file or folder: {tmp_path / 'nonexistent'}" in result.stderr
    assert _nothing_created(settings)


def test_cli_ingest_of_files_that_are_not_photos_fails_without_a_job(settings: Settings, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    result = CliRunner().invoke(app, ["ingest", str(notes), "--json"])
    assert result.exit_code == 1, result.output
    assert [f["path"] for f in json.loads(result.stdout)["failed"]] == [str(notes)]
    assert "nothing to ingest" in result.stderr
    assert _nothing_created(settings)


def test_cli_ingest_of_a_folder_of_bad_files_fails(settings: Settings, tmp_path: Path) -> None:
    sample = tmp_path / "sample.jpg"
    Image.new("RGB", (96, 80), (10, 200, 90)).save(sample)
    bad = write_bad_files(tmp_path / "bad" / "ant", sample)
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "bad")])
    assert result.exit_code == 1, result.output
    assert f"failed {len(bad)}" in result.stdout and "nothing could be ingested" in result.stderr


def test_cli_ingest_with_some_bad_files_still_succeeds(settings: Settings, photos_dir: Path) -> None:
    good = sorted(photos_dir.rglob("*.jpg"))
    bad = write_bad_files(photos_dir / "ant", good[0])
    result = CliRunner().invoke(app, ["ingest", str(photos_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["added"] == len(good) and len(summary["failed"]) == len(bad)


# --- Redis records keep their expiry ------------------------------------------------------------------------


@pytest.fixture
def redis_jobs() -> Iterator[RedisJobStore]:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"needs a real Redis at {REDIS_URL} ({exc})")
    store = RedisJobStore(REDIS_URL)

    def job_ids() -> set[str]:
        return {str(i) for i in store.client.zrange("sketchsearch:jobs", 0, -1)}  # type: ignore[union-attr]

    before = job_ids()
    yield store
    for job_id in job_ids() - before:
        store.client.delete(f"sketchsearch:job:{job_id}")
        store.client.zrem("sketchsearch:jobs", job_id)
    store.close()


def test_every_write_to_a_redis_record_sets_its_expiry(redis_jobs: RedisJobStore, tmp_path: Path) -> None:
    job, _ = new_job([PhotoFile(tmp_path / "a.jpg", "a")], 8, "celery", None)
    redis_jobs.create_job(job)
    key = f"sketchsearch:job:{job.id}"
    writes = {
        "update_meta": lambda: redis_jobs.update_meta(job),
        "mark_started": lambda: redis_jobs.mark_started(job.id, 0),
        "record_batch": lambda: redis_jobs.record_batch(job.id, BatchReport(0, IngestSummary())),
    }
    for name, write in writes.items():
        redis_jobs.client.persist(key)  # as if the record had been written without an expiry
        write()
        assert int(redis_jobs.client.ttl(key)) > 0, name  # type: ignore[arg-type]
        redis_jobs.client.delete(key)  # as if it had expired: the write recreates it, with an expiry again
        write()
        assert int(redis_jobs.client.ttl(key)) > 0, name  # type: ignore[arg-type]


def test_a_redis_that_refuses_a_command_for_good_is_not_called_unreachable(
    redis_jobs: RedisJobStore, tmp_path: Path
) -> None:
    job, _ = new_job([PhotoFile(tmp_path / "a.jpg", "a")], 8, "celery", None)
    redis_jobs.create_job(job)
    key = f"sketchsearch:job:{job.id}"
    redis_jobs.client.delete(key)
    redis_jobs.client.set(key, "not a hash")  # WRONGTYPE for every hash command, however long one waits
    with pytest.raises(JobStoreError, match="WRONGTYPE") as caught:
        redis_jobs.mark_started(job.id, 0)
    # a worker hands a batch back on BrokerUnavailableError; on this it must not, or it loops forever
    assert not isinstance(caught.value, BrokerUnavailableError)
    assert "retrying will not help" in str(caught.value)


def test_a_redis_out_of_memory_is_waited_for_not_given_up(redis_jobs: RedisJobStore, tmp_path: Path) -> None:
    job, _ = new_job([PhotoFile(tmp_path / "a.jpg", "a")], 8, "celery", None)
    redis_jobs.create_job(job)
    client = redis_jobs.client
    before = str(client.config_get("maxmemory")["maxmemory"])  # type: ignore[index]
    policy = str(client.config_get("maxmemory-policy")["maxmemory-policy"])  # type: ignore[index]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # every write is refused with OOM until memory is freed or raised
    try:
        # a full Redis frees up (or is given memory): the worker hands the batch back rather than dropping it
        with pytest.raises(BrokerUnavailableError, match="OutOfMemoryError"):
            redis_jobs.mark_started(job.id, 0)
    finally:
        client.config_set("maxmemory", before)
        client.config_set("maxmemory-policy", policy)
    redis_jobs.mark_started(job.id, 0)
    assert redis_jobs.get_job(job.id).attempts == {0: 1}


def test_a_redis_that_says_not_now_inside_a_pipeline_is_waited_for(redis_jobs: RedisJobStore) -> None:
    import redis

    # what redis-py raises for MISCONF inside a pipeline: the reply's code after its own annotation
    annotated = redis.ResponseError(
        "Command # 1 (HINCRBY sketchsearch:job:x started:0 1) of pipeline caused error: MISCONF Redis is "
        "configured to save RDB snapshots, but it's currently unable to persist to disk"
    )
    for exc, expected in (
        (annotated, BrokerUnavailableError),
        (redis.ResponseError("BUSYKEY Target key"), JobStoreError),
    ):
        with pytest.raises(expected):
            with redis_jobs._translated():
                raise exc
