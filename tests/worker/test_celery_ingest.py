"""Ingestion through Celery with the real Redis and real `sketchsearch worker` processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from services.config import Settings
from services.errors import StoreLockedError
from services.ingest import collect_photos, hash_file
from services.jobs import Job, JobState, RedisJobStore
from services.vector_store import collection_name, open_store, photo_id
from tests.services.gallery_support import (
    SKETCHSEARCH,
    cli_env,
    copy_photos,
    start_cli,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.e2e]


def _run(args: list[str], env: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run the sketchsearch CLI as its own process."""
    command = [str(SKETCHSEARCH), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _stored_ids(home: Path, model_id: str, dim: int) -> tuple[int, set[str]]:
    """Open the embedded store (the worker must be gone) and read what the model's collection holds."""
    with open_store(Settings(home=home)) as store:
        name = collection_name(model_id, dim, store.neighbours)
        points, _ = store.client.scroll(name, limit=10_000, with_payload=False)
        return store.count_photos(name), {str(p.id) for p in points}


def _expected_ids(folder: Path) -> set[str]:
    files, _ = collect_photos([folder])
    return {photo_id(hash_file(f.path)) for f in files}


def _model_id(path: Path) -> str:
    from encoder.checkpoint import load_checkpoint

    return load_checkpoint(path).model_id


def test_worker_ingests_a_folder_and_every_photo_is_stored(
    tmp_path: Path, sketchy: Path, redis_url: str, queue: str, tiny_model: Path
) -> None:
    photos = tmp_path / "photos"
    copy_photos(photos, ["bat", "cow", "pear"], 10)
    home = tmp_path / "home"
    env = cli_env(home=str(home), model=str(tiny_model), broker_url=redis_url, queue=queue, batch_size="8")
    worker = start_cli(["worker"], env, tmp_path / "worker.log")
    try:
        first = _run(["ingest", str(photos), "--wait", "--json"], env)
        assert first.returncode == 0, first.stderr + (tmp_path / "worker.log").read_text()
        assert json.loads(first.stdout)["added"] == 30
        second = _run(["ingest", str(photos), "--wait", "--json"], env)
        summary = json.loads(second.stdout)
        assert (summary["added"], summary["already_present"], summary["failed"]) == (0, 30, [])

        jobs = json.loads(_run(["jobs", "--json"], env).stdout)
        assert [(j["state"], j["photos"], j["batches"]) for j in jobs][:2] == [("done", 30, 4)] * 2

        # the worker owns the embedded store: another process is told so, and what to do
        stats = _run(["stats"], env)
        assert stats.returncode == 2
        assert "python -m worker" in stats.stderr and "SKETCHSEARCH_QDRANT_URL" in stats.stderr
    finally:
        assert stop_process(worker) == 0, (tmp_path / "worker.log").read_text()
    count, ids = _stored_ids(home, _model_id(tiny_model), 128)
    assert count == 30 and ids == _expected_ids(photos)


def test_killing_the_worker_mid_batch_still_stores_every_photo_once(
    tmp_path: Path, sketchy: Path, redis_url: str, queue: str, slow_model: Path
) -> None:
    photos = tmp_path / "photos"
    copy_photos(photos, ["giraffe", "mouse", "raccoon"], 12)
    home = tmp_path / "home"
    env = cli_env(
        home=str(home),
        model=str(slow_model),
        broker_url=redis_url,
        queue=queue,
        batch_size="12",
        visibility_timeout="3",
    )
    log = tmp_path / "worker.log"
    jobs = RedisJobStore(redis_url)

    sent = _run(["ingest", str(photos)], env)
    assert sent.returncode == 0, sent.stderr
    match = re.search(r"job (\w+): 36 photos in 3 batches", sent.stderr)
    assert match, sent.stderr
    job_id = match.group(1)

    def in_flight(job: Job) -> list[int]:
        return [i for i in job.attempts if i not in job.reports]

    first = start_cli(["worker"], env, log)
    try:
        wait_for(lambda: bool(in_flight(jobs.get_job(job_id))), 180, "the first batch to start")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop_process(first, signal.SIGKILL)
    killed = jobs.get_job(job_id)
    interrupted = in_flight(killed)
    assert killed.state == JobState.RUNNING and interrupted, killed.to_json()

    second = start_cli(["worker"], env, log)
    try:
        wait_for(lambda: jobs.get_job(job_id).finished, 180, "the job to finish after the restart")
    finally:
        assert stop_process(second) == 0, log.read_text()
    done = jobs.get_job(job_id)
    assert done.state == JobState.DONE, done.to_json()
    for index in interrupted:  # the batch that was killed ran again: it was never acknowledged
        assert done.attempts[index] >= 2, done.to_json()
    summary = done.summary()
    assert summary.failed == 0 and summary.added + summary.already_present == 36
    count, ids = _stored_ids(home, _model_id(slow_model), 16)
    assert count == 36 and ids == _expected_ids(photos)


def test_broker_down_is_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    env = cli_env(home=str(tmp_path / "home"), model=str(tiny_model), broker_url="redis://127.0.0.1:1")
    for args in (["ingest", str(photos), "--wait"], ["worker"], ["jobs"]):
        result = _run(args, env, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert "cannot reach the broker at redis://127.0.0.1:1" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_worker_refuses_a_store_held_by_another_process(
    tmp_path: Path, redis_url: str, queue: str, tiny_model: Path
) -> None:
    home = tmp_path / "home"
    env = cli_env(home=str(home), model=str(tiny_model), broker_url=redis_url, queue=queue)
    holder = open_store(Settings(home=home))  # this test process owns the embedded store
    try:
        result = _run(["worker"], env, timeout=120)
        with pytest.raises(StoreLockedError):  # and within one process the lock holds too
            open_store(Settings(home=home))
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert f"process {os.getpid()}" in result.stderr and "SKETCHSEARCH_QDRANT_URL" in result.stderr
    assert "Traceback" not in result.stderr
