"""The vector store on real qdrant-client local mode: collections, alias, dimensions, the one-owner lock."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import models

from encoder.errors import SketchSearchError
from encoder.neighbours import blend_gallery
from services.config import Settings
from services.errors import (
    ConfigError,
    DimensionMismatchError,
    GalleryNotFoundError,
    StoreLockedError,
    StoreUnavailableError,
)
from services.vector_store import (
    FLOOR_KEY,
    GALLERY_ALIAS,
    GALLERY_VECTOR,
    PHOTO_VECTOR,
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
    assert str(uuid.UUID(photo_id(sha))) == photo_id(sha)  # a canonical UUID, as Qdrant wants point ids
    assert photo_id(sha).replace("-", "") == sha[:32]
    assert photo_id(sha) != photo_id("cd" * 32)


def test_collection_per_model_and_alias_follows_the_active_one(store: VectorStore) -> None:
    first = store.ensure_collection("model-a-v1-0001", 8)
    assert first == collection_name("model-a-v1-0001", 8, store.neighbours)
    assert "model-a-v1-0001" in first and "d8" in first and f"n{store.neighbours}" in first
    assert store.alias_target(GALLERY_ALIAS) == first
    second = store.ensure_collection("model-b-v1-0002", 16)
    assert store.alias_target(GALLERY_ALIAS) == second
    assert set(store.list_collections()) == {first, second}
    info = store.client.get_collection(second).config.params.vectors
    assert isinstance(info, dict) and set(info) == {PHOTO_VECTOR, GALLERY_VECTOR}
    assert all(v.size == 16 and v.distance == models.Distance.COSINE for v in info.values())


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
    name = collection_name("model-a-v1-0001", 8, store.neighbours)
    # a collection of the right name but the wrong size (built by hand, or by another tool)
    params = models.VectorParams(size=4, distance=models.Distance.COSINE)
    store.client.create_collection(name, vectors_config={PHOTO_VECTOR: params, GALLERY_VECTOR: params})
    with pytest.raises(DimensionMismatchError, match="SKETCHSEARCH_MODEL") as err:
        store.ensure_collection("model-a-v1-0001", 8)
    assert "4-dimensional" in str(err.value) and "8 dimensions" in str(err.value)
    with pytest.raises(DimensionMismatchError):
        store.find_collection("model-a-v1-0001", 8)
    assert store.count_photos(name) == 0


def test_a_collection_of_another_layout_is_refused(store: VectorStore) -> None:
    # one unnamed vector per point: what sketchsearch wrote before gallery vectors, or another tool
    name = collection_name("model-a-v1-0001", 8, store.neighbours)
    store.client.create_collection(name, vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
    with pytest.raises(DimensionMismatchError, match="another layout"):
        store.ensure_collection("model-a-v1-0001", 8)
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


def _clustered(n: int, dim: int, seed: int) -> tuple[list[PhotoRecord], np.ndarray]:
    """n unit vectors in a few tight-ish clusters (as photos of a few categories), with records."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim))
    vectors = centres[rng.integers(0, 6, size=n)] + 0.6 * rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    records = [
        PhotoRecord(photo_id(hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()), f"/p/{i}.jpg", "c", "", 1, 1, "")
        for i in range(n)
    ]
    return records, vectors


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect")  # the server path asks local mode for one
@pytest.mark.parametrize("path", ["embedded index", "server queries"])
def test_gallery_vectors_are_the_whole_gallery_blend_whatever_the_batches(store: VectorStore, path: str) -> None:
    records, vectors = _clustered(70, 8, seed=3)
    ids = [r.id for r in records]
    expected = blend_gallery(vectors, store.neighbours)
    assert store.neighbours == 5 and not np.allclose(expected, vectors, atol=1e-3)
    name = store.ensure_collection("model-a-v1-0001", 8)
    # a server's stores blend through queries and payload floors: the same client code runs on local mode
    store.embedded = path == "embedded index"
    order = np.random.default_rng(0).permutation(len(records))
    for start in range(0, len(order), 9):  # batches of 9 in a shuffled order, as ingestion jobs arrive
        rows = order[start : start + 9]
        store.upsert_photos(name, [records[i] for i in rows], vectors[rows])
    assert np.allclose(store.read_vectors(name, ids, PHOTO_VECTOR), vectors, atol=1e-6)
    assert np.allclose(store.read_vectors(name, ids), expected, atol=1e-5)
    # search ranks by the gallery vectors
    hits = store.search(name, vectors[0], limit=70)
    assert [h.id for h in hits[:10]] == [ids[i] for i in np.argsort(-(expected @ vectors[0]))[:10]]
    assert np.allclose(sorted((h.score for h in hits), reverse=True), np.sort(expected @ vectors[0])[::-1], atol=1e-5)
    # one batch of everything gives the same vectors; so does writing it all again
    again = store.ensure_collection("model-b-v1-0002", 8)
    store.upsert_photos(again, records, vectors)
    store.upsert_photos(again, records, vectors)
    assert np.allclose(store.read_vectors(again, ids), expected, atol=1e-5)


def test_a_new_owner_mends_gallery_vectors_left_stale(settings: Settings) -> None:
    records, vectors = _clustered(30, 8, seed=5)
    ids = [r.id for r in records]
    with open_store(settings) as first:
        name = first.ensure_collection("model-a-v1-0001", 8)
        first.upsert_photos(name, records[:29], vectors[:29])
        # as if a process died after writing a batch but before blending its neighbours again
        first.client.update_vectors(
            name, points=[models.PointVectors(id=ids[0], vector={GALLERY_VECTOR: vectors[0].tolist()})]
        )
    with open_store(settings) as second:
        second.upsert_photos(name, records[29:], vectors[29:])
        assert np.allclose(second.read_vectors(name, ids), blend_gallery(vectors, second.neighbours), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect")
@pytest.mark.parametrize("path", ["embedded index", "server queries"])
def test_reblend_rewrites_exactly_the_stale_gallery_vectors_and_floors(store: VectorStore, path: str) -> None:
    records, vectors = _clustered(40, 8, seed=7)
    ids = [r.id for r in records]
    name = store.ensure_collection("model-a-v1-0001", 8)
    store.embedded = path == "embedded index"
    store.upsert_photos(name, records, vectors)
    assert store.reblend(name) == (0, 40)  # nothing stale: nothing rewritten
    # three gallery vectors left stale, and on a server two floors lost (written, never blended)
    stale = [ids[3], ids[17], ids[29]]
    store.client.update_vectors(
        name, points=[models.PointVectors(id=i, vector={GALLERY_VECTOR: vectors[0].tolist()}) for i in stale]
    )
    if not store.embedded:
        store.client.delete_payload(name, keys=[FLOOR_KEY], points=[ids[5], ids[17]])
        assert ids[5] not in store.existing_ids(name, ids)
    assert store.reblend(name) == (3, 40)
    expected = blend_gallery(vectors, store.neighbours)
    assert np.allclose(store.read_vectors(name, ids), expected, atol=1e-5)
    if not store.embedded:
        # every floor is the cosine of the photo's 5th nearest other photo again, so each counts as stored
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        kth = np.sort(sims, axis=1)[:, -5]
        floors = {str(p.id): (p.payload or {})[FLOOR_KEY] for p in store.client.retrieve(name, ids, with_payload=True)}
        assert np.allclose([floors[i] for i in ids], kth, atol=1e-5)
        assert store.existing_ids(name, ids) == set(ids)
    assert store.reblend(name) == (0, 40)


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect")
def test_on_a_server_a_photo_written_but_never_blended_is_not_counted_as_stored(store: VectorStore) -> None:
    records, vectors = _clustered(12, 8, seed=6)
    name = store.ensure_collection("model-a-v1-0001", 8)
    store.embedded = False  # the server path, on local mode
    store.upsert_photos(name, records[:11], vectors[:11])
    # as if a worker died between writing the last photo and blending it: no floor in its payload
    last = records[11]
    store.client.upsert(
        name,
        points=[
            models.PointStruct(
                id=last.id,
                vector={PHOTO_VECTOR: vectors[11].tolist(), GALLERY_VECTOR: vectors[11].tolist()},
                payload=last.payload(),
            )
        ],
    )
    assert store.existing_ids(name, [r.id for r in records]) == {r.id for r in records[:11]}
    store.upsert_photos(name, [last], vectors[11:])  # the batch done again
    assert store.existing_ids(name, [r.id for r in records]) == {r.id for r in records}
    assert np.allclose(store.read_vectors(name, [r.id for r in records]), blend_gallery(vectors, 5), atol=1e-5)


def test_a_gallery_of_another_layout_or_neighbour_count_says_to_ingest_again(store: VectorStore) -> None:
    store.neighbours = 3
    store.ensure_collection("model-a-v1-0001", 8)
    store.neighbours = 5
    with pytest.raises(GalleryNotFoundError, match=r"SKETCHSEARCH_GALLERY_NEIGHBOURS \(3, now 5\)"):
        store.find_collection("model-a-v1-0001", 8)
    # a collection written before gallery vectors: one unnamed vector, the old name, the alias on it
    old = "photos-model-a-v1-0001-d8"
    store.client.create_collection(old, vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
    store.client.update_collection_aliases(
        change_aliases_operations=[
            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=GALLERY_ALIAS)),
            models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=old, alias_name=GALLERY_ALIAS)),
        ]
    )
    with pytest.raises(GalleryNotFoundError, match="before photos had gallery vectors.*sketchsearch ingest"):
        store.find_collection("model-a-v1-0001", 8)


def test_no_gallery_neighbours_is_its_own_collection_of_plain_embeddings(store: VectorStore) -> None:
    records, vectors = _clustered(20, 8, seed=4)
    blended = store.ensure_collection("model-a-v1-0001", 8)
    store.neighbours = 0
    plain = store.ensure_collection("model-a-v1-0001", 8)
    assert plain != blended and plain.endswith("-n0")
    store.upsert_photos(plain, records, vectors)
    assert np.allclose(store.read_vectors(plain, [r.id for r in records]), vectors, atol=1e-6)


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


def test_a_server_url_that_cannot_be_parsed_is_a_config_error(settings: Settings) -> None:
    for url in ("http://127.0.0.1:abc", "ftp://qdrant"):
        with pytest.raises(ConfigError, match="SKETCHSEARCH_QDRANT_URL"):
            open_store(settings.model_copy(update={"qdrant_url": url}))


def test_a_damaged_embedded_store_is_a_clear_error_and_releases_the_lock(settings: Settings) -> None:
    with open_store(settings) as store:
        name = store.ensure_collection("model-a-v1-0001", 8)
    (settings.store_path / "collection" / name / "storage.sqlite").write_bytes(b"\x00not a database" * 300)
    with pytest.raises(StoreUnavailableError, match="damaged"):
        open_store(settings)
    # the failed open let go of the owner lock: once the folder is moved aside, the store opens again
    (settings.store_path).rename(settings.home / "qdrant-damaged")
    with open_store(settings) as fresh:
        assert fresh.list_collections() == []


def test_an_embedded_store_that_cannot_be_opened_is_not_called_damaged(settings: Settings) -> None:
    with open_store(settings) as store:
        name = store.ensure_collection("model-a-v1-0001", 8)
    storage = settings.store_path / "collection" / name / "storage.sqlite"
    storage.unlink()
    storage.mkdir()  # SQLite cannot open a folder: "unable to open database file", as root too (unlike chmod)
    with pytest.raises(StoreUnavailableError, match="cannot open the embedded store at") as caught:
        open_store(settings)
    # the file is not damaged: moving the store aside (and ingesting everything again) is not the fix
    assert "damaged" not in str(caught.value) and "move the folder aside" not in str(caught.value)
    storage.rmdir()
    with open_store(settings) as again:  # the failed open let go of the owner lock
        assert again.list_collections() == [name]


def test_a_collection_deleted_meanwhile_says_to_ingest_again(store: VectorStore) -> None:
    name = store.ensure_collection("model-a-v1-0001", 8)
    store.client.delete_collection(name)  # another tool, or a person, removes it under a running process
    with pytest.raises(GalleryNotFoundError, match="sketchsearch ingest") as caught:
        store.count_photos(name)
    assert not isinstance(caught.value, StoreUnavailableError)  # waiting does not bring it back: not retried


def test_a_wrong_argument_propagates_instead_of_passing_for_an_unavailable_store(settings: Settings) -> None:
    # a programming error (vectors of the wrong dimension) that local mode reports as a plain ValueError: the
    # worker retries StoreUnavailableError as if the store were down, which would only delay the traceback
    with open_store(settings.model_copy(update={"gallery_neighbours": 0})) as store:
        name = store.ensure_collection("model-a-v1-0001", 8)
        records, vectors = _records(3)
        with pytest.raises(ValueError, match="dimension") as caught:
            store.upsert_photos(name, records, np.ascontiguousarray(vectors[:, :4]))
        assert not isinstance(caught.value, SketchSearchError)
        assert store.count_photos(name) == 0


def test_no_store_message_shows_the_qdrant_url_key(settings: Settings) -> None:
    secret = "s3cret-Ap1-key"
    unreachable = (f"http://bob:{secret}@127.0.0.1:1", f"http://127.0.0.1:1/?api_key={secret}")
    for url in unreachable:
        with pytest.raises(StoreUnavailableError) as caught:
            open_store(settings.model_copy(update={"qdrant_url": url}))
        assert secret not in str(caught.value) and "***" in str(caught.value), str(caught.value)
    for url in (f"http://{secret}@127.0.0.1:abc", f"http://127.0.0.1:abc?api_key={secret}"):
        with pytest.raises(ConfigError) as bad:
            open_store(settings.model_copy(update={"qdrant_url": url}))
        assert secret not in str(bad.value) and "***" in str(bad.value), str(bad.value)


def test_losing_the_race_to_create_a_collection_uses_the_winners(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two workers start on an empty server: both see no collection, one creates it, the other's create fails.
    # Here the second ensure_collection is told once that the collection is missing, so its create fails
    # for real (qdrant-client refuses to create what exists: a CollectionExistsError) and it must fall back
    # to the existing one.
    name = store.ensure_collection("model-a-v1-0001", 8)
    real = store.collection_dimension
    answers = iter([None])
    monkeypatch.setattr(store, "collection_dimension", lambda n: next(answers, real(n)))
    assert store.ensure_collection("model-a-v1-0001", 8) == name
    assert store.alias_target(GALLERY_ALIAS) == name
