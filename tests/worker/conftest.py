"""Fixtures of the worker tests: the real Redis of this machine, a queue of their own, real photos."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.gallery_support import build_tiny_model

REDIS_URL = "redis://127.0.0.1:6379/15"  # a database of its own, cleaned of what the tests create


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"needs a real Redis at {REDIS_URL} ({exc}); .ci/run starts one")
    return REDIS_URL


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    """A queue name nobody else uses; its messages and the jobs created meanwhile are removed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    def job_ids() -> set[str]:
        return {str(i) for i in client.zrange("sketchsearch:jobs", 0, -1)}  # type: ignore[union-attr]

    before = job_ids()
    name = f"sketchsearch-test-{uuid.uuid4().hex[:8]}"
    yield name
    created = job_ids() - before
    for job_id in created:
        client.delete(f"sketchsearch:job:{job_id}")
        client.zrem("sketchsearch:jobs", job_id)
    # messages a killed worker left unacknowledged (the hash is shared by the database's queues)
    for tag, raw in client.hgetall("unacked").items():  # type: ignore[union-attr]
        if json.loads(raw)[2] == name:  # [message, exchange, routing key]
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Still tiny on disk, but at 384 px a batch of 12 photos takes long enough to be killed in the middle."""
    path = tmp_path_factory.mktemp("models") / "slow16.pt"
    build_tiny_model(path, dim=16, image_size=384)
    return path
