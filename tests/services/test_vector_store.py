"""The vector store on real qdrant-client local mode: collections, alias, dimensions, the one-owner lock."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import models

from services.config import Settings
from services.errors import (
    DimensionMismatchError,
    GalleryNotFoundError,
    StoreLockedError,
    StoreUnavailableError,
)
from services.vector_store import (
    GALLERY_ALIAS,
    PhotoRecord,
    VectorStore,
    collection_name,
    open_store,
    photo_id,
)
from tests.services.gallery_support import SKETCHSEARCH, cli_env

pytestmark = pytest.mark.integration


def _records(n: int, category: str = "cat") -> tuple[list[PhotoRecord], np.ndarray]:
    rng = np.random.default_rng(n)
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = []
    for i in range(n):
        sha = hashlib.sha256(f"{category}-{i}".encode()).hexdigest()
        records.append(
            PhotoRecord(photo_id(sha), f"/p/{i}.jpg", category, sha, 10, 20, "2024-01-01T00:00:00")
        )
    return records, vectors


def test_photo_id_comes_from_the_hash() -> None:
    sha = "ab" * 32
    assert photo_id(sha) == photo_id(sha)
    assert photo_id(sha).replace("-", "") == sha[:32]
    assert photo_id(sha) != photo_id("cd" * 32)


def test_collection_per_model_and_alias_follows_the_active_one(store: VectorStore) -> None:
    first = store.ensure_collection("model-a-v1-0001", 8)
    assert first == collection_name("model-a-v1-0001", 8)
    assert "model-a-v1-0001" in first and "8" in first
    assert store.alias_target(GALLERY_ALIAS) == first
    second = store.ensure_collection("model-b-v1-0002", 16)
    assert store.alias_target(GALLERY_ALIAS) == second
    assert set(store.list_collections()) == {first, second}
    info = store.client.get_collection(second).config.params.vectors
    assert isinstance(info, models.VectorParams)
    assert info.size == 16 and info.distance == models.Distance.COSINE


def test_upsert_is_idempotent_and_ids_can_be_checked(store: VectorStore) -> None:
    name = store.ensure_collection("model-a-v1-0001", 8)
    records, vectors = _records(5)
    store.upsert_photos(name, records, vectors)
    store.upsert_photos(name, records, vectors)
    assert store.count_photos(name) == 5
    unknown = photo_id("ff" * 32)
    assert store.existing_ids(name, [records[0].id, unknown]) == {records[0].id}
    got = store.get_photo(name, records[2].id)
    assert got == records[2]


def test_dimension_mismatch_is_refused_and_never_written(store: VectorStore) -> None:
    name = collection_name("model-a-v1-0001", 8)
    # a collection of the right name but the wrong size (built by hand, or by another tool)
    store.client.create_collection(
        name, vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE)
    )
    with pytest.raises(DimensionMismatchError, match="SKETCHSEARCH_MODEL") as err:
        store.ensure_collection("model-a-v1-0001", 8)
    assert "4-dimensional" in str(err.value) and "8 dimensions" in str(err.value)
    with pytest.raises(DimensionMismatchError):
        store.find_collection("model-a-v1-0001", 8)
    assert store.count_photos(name) == 0


def test_reading_another_models_gallery_names_the_fix(store: VectorStore) -> None:
    store.ensure_collection("model-a-v1-0001", 8)
    with pytest.raises(DimensionMismatchError, match="SKETCHSEARCH_MODEL"):
        store.find_collection("model-b-v1-0002", 16)
    with pytest.raises(GalleryNotFoundError, match="sketchsearch ingest"):
        store.find_collection("model-c-v1-0003", 8)


def test_category_counts_and_filter(store: VectorStore) -> None:
    name = store.ensure_collection("model-a-v1-0001", 8)
    a, va = _records(3, "cat")
    b, vb = _records(4, "dog")
    store.upsert_photos(name, a + b, np.concatenate([va, vb]))
    assert store.count_categories(name) == {"dog": 4, "cat": 3}
    hits = store.search(name, va[0], limit=10, category="cat")
    assert {h.category for h in hits} == {"cat"} and len(hits) == 3


_HOLDER = textwrap.dedent(
    """
    import sys
    from services.config import get_settings
    from services.vector_store import open_store
    store = open_store(get_settings())
    print("holding", flush=True)
    sys.stdin.readline()
    store.close()
    """
)


@pytest.mark.e2e
def test_second_process_gets_a_clear_lock_error(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(home=str(settings.home), model=settings.model)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(StoreLockedError) as err:
            open_store(settings)
        message = str(err.value)
        assert "SKETCHSEARCH_QDRANT_URL" in message
        assert f"process {holder.pid}" in message
        # the CLI says the same, without a traceback
        cli = subprocess.run(
            [str(SKETCHSEARCH), "stats"], env=env, capture_output=True, text=True, timeout=120
        )
        assert cli.returncode == 2
        assert "SKETCHSEARCH_QDRANT_URL" in cli.stderr and "Traceback" not in cli.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    # once the owner is gone the store opens again, intact
    with open_store(settings) as again:
        assert again.list_collections() == []


def test_unreachable_server_says_how_to_fall_back(settings: Settings) -> None:
    remote = settings.model_copy(update={"qdrant_url": "http://127.0.0.1:1"})
    with pytest.raises(StoreUnavailableError, match="unset SKETCHSEARCH_QDRANT_URL"):
        open_store(remote)
