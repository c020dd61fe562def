"""Ingestion into a real embedded store with a tiny real model: skip known photos, bad files, resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from services.cli import app
from services.config import Settings, get_settings
from services.gallery import Gallery
from services.ingest import PhotoFile, collect_photos, hash_file, ingest_batch, ingest_files
from services.jobs import FileJobStore, JobState, LocalJobRunner, follow_job
from services.vector_store import photo_id
from tests.services.gallery_support import write_bad_files

pytestmark = pytest.mark.integration


def _ids(paths: list[Path]) -> list[str]:
    return [photo_id(hash_file(p)) for p in paths]


def test_collect_walks_folders_and_rejects_what_cannot_be_a_photo(photos_dir: Path, tmp_path: Path) -> None:
    (photos_dir / "ant" / "readme.txt").write_text("not walked")
    stray = tmp_path / "notes.txt"
    stray.write_text("named explicitly")
    files, rejected = collect_photos([photos_dir, photos_dir / "ant", stray, tmp_path / "missing"])
    assert len(files) == 24  # the folder named twice still gives each photo once
    assert all(f.path.is_absolute() and f.category == f.path.parent.name for f in files)
    assert {r.path for r in rejected} == {str(stray), str(tmp_path / "missing")}
    labelled, _ = collect_photos([photos_dir], label="holiday")
    assert {f.category for f in labelled} == {"holiday"}


def test_ingest_stores_every_photo_with_its_payload(gallery: Gallery, photos_dir: Path) -> None:
    files, _ = collect_photos([photos_dir])
    summary = ingest_files(gallery, files, batch_size=8)
    assert (summary.added, summary.already_present, summary.failed) == (24, 0, 0)
    paths = [f.path for f in files]
    assert gallery.store.existing_ids(gallery.collection, _ids(paths)) == set(_ids(paths))
    assert gallery.store.count_photos(gallery.collection) == 24
    record = gallery.store.get_photo(gallery.collection, _ids(paths[:1])[0])
    assert record is not None
    assert record.path == str(paths[0]) and record.category == paths[0].parent.name
    assert record.sha256 == hash_file(paths[0])
    assert (record.width, record.height) == Image.open(paths[0]).size
    assert record.ingested_at.startswith("20")


def test_ingesting_twice_adds_nothing_and_same_bytes_elsewhere_are_one_photo(
    gallery: Gallery, photos_dir: Path, tmp_path: Path
) -> None:
    files, _ = collect_photos([photos_dir])
    ingest_files(gallery, files, batch_size=8)
    again = ingest_files(gallery, files, batch_size=8)
    assert (again.added, again.already_present, again.failed) == (0, 24, 0)
    copy_dir = tmp_path / "copies" / "elsewhere"
    copy_dir.mkdir(parents=True)
    shutil.copy2(files[0].path, copy_dir / "renamed.jpg")
    shutil.copy2(files[1].path, copy_dir / "renamed2.jpg")
    shutil.copy2(files[1].path, copy_dir / "renamed3.jpg")  # the same bytes twice within one batch
    copies, _ = collect_photos([copy_dir])
    summary = ingest_batch(gallery, copies)
    assert (summary.added, summary.already_present) == (0, 3)
    assert gallery.store.count_photos(gallery.collection) == 24


def test_bad_files_are_reported_and_never_stop_the_run(gallery: Gallery, photos_dir: Path) -> None:
    good = sorted(photos_dir.rglob("*.jpg"))
    bad = write_bad_files(photos_dir / "ant", good[0])
    files, _ = collect_photos([photos_dir])
    summary = ingest_files(gallery, files, batch_size=8)
    assert summary.added == len(good) == 24
    failed = {Path(f.path): f.reason for f in summary.failures}
    assert set(failed) == {p.resolve() for p in bad.values()}
    assert "pixels exceeds the limit" in failed[bad["huge"].resolve()]
    assert "truncated" in failed[bad["truncated"].resolve()]
    assert "not a readable image" in failed[bad["text"].resolve()]
    assert gallery.store.existing_ids(gallery.collection, _ids(good)) == set(_ids(good))


def test_an_interrupted_run_redone_does_only_what_is_missing(gallery: Gallery, photos_dir: Path) -> None:
    files, _ = collect_photos([photos_dir])
    done: list[int] = []
    first = ingest_files(
        gallery, files, batch_size=8, on_batch=lambda i, s: done.append(i), should_stop=lambda: len(done) == 1
    )
    assert first.added == 8 and done == [0]
    second = ingest_files(gallery, files, batch_size=8)
    assert (second.added, second.already_present) == (16, 8)


def test_local_job_runner_records_progress(gallery: Gallery, photos_dir: Path, settings: Settings) -> None:
    jobs = FileJobStore(settings.jobs_path)
    runner = LocalJobRunner(gallery, jobs, batch_size=5)
    files, rejected = collect_photos([photos_dir, photos_dir / "nothing-here"])
    job = runner.submit(files, label=None, rejected=rejected)
    readings: list[int] = []
    final = follow_job(jobs, job.id, on_update=lambda j: readings.append(j.done_photos), poll_s=0.01)
    runner.shutdown()
    assert final.state == JobState.DONE
    assert (final.photos, final.batches, final.done_photos) == (24, 5, 24)
    summary = final.summary()
    assert summary.added == 24 and [f.reason for f in summary.failures] == ["no such file or folder"]
    assert readings == sorted(readings)
    assert jobs.list_jobs()[0].id == job.id


def test_cli_ingest_in_process_then_jobs(settings: Settings, photos_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(photos_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["already_present"], summary["failed"]) == (24, 0, [])
    again = json.loads(runner.invoke(app, ["ingest", str(photos_dir), "--label", "x", "--json"]).stdout)
    assert (again["added"], again["already_present"]) == (0, 24)
    listed = runner.invoke(app, ["jobs", "--json"])
    get_settings.cache_clear()
    jobs = json.loads(listed.stdout)
    assert [j["state"] for j in jobs] == ["done", "done"]
    assert [j["added"] for j in jobs] == [0, 24]  # newest first


def test_a_symlinked_photo_takes_the_category_of_the_folder_it_is_found_in(
    photos_dir: Path, tmp_path: Path
) -> None:
    target = sorted((photos_dir / "ant").glob("*.jpg"))[0]
    holiday = tmp_path / "albums" / "holiday"
    holiday.mkdir(parents=True)
    (holiday / "beach.jpg").symlink_to(target)
    files, rejected = collect_photos([tmp_path / "albums"])
    assert rejected == [] and [(f.path, f.category) for f in files] == [(target.resolve(), "holiday")]


def test_copies_of_a_corrupt_photo_in_one_batch_all_fail(gallery: Gallery, photos_dir: Path) -> None:
    good = sorted((photos_dir / "ant").glob("*.jpg"))[0]
    broken = photos_dir / "ant" / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:400])  # a truncated JPEG
    copy = photos_dir / "ape" / "broken-copy.jpg"
    copy.write_bytes(broken.read_bytes())
    summary = ingest_batch(gallery, [PhotoFile(good, "ant"), PhotoFile(broken, "ant"), PhotoFile(copy, "ape")])
    assert (summary.added, summary.already_present) == (1, 0)
    assert {f.path for f in summary.failures} == {str(broken), str(copy)}
    # copies of a good photo are stored once and the copy counts as present
    good_copy = photos_dir / "ape" / "good-copy.jpg"
    good_copy.write_bytes(good.read_bytes())
    second = sorted((photos_dir / "ape").glob("n*.jpg"))[0]
    again = ingest_batch(gallery, [PhotoFile(second, "ape"), PhotoFile(good_copy, "ape"), PhotoFile(good, "ant")])
    assert (again.added, again.already_present, again.failures) == (1, 2, [])
