"""`sketchsearch train` and `sketchsearch eval` end to end: a checkpoint folder, then the exact JSON keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from encoder.checkpoint import load_checkpoint
from encoder.embedder import load_embedder
from encoder.evaluate import evaluate_dataset
from services.cli import app
from tests.encoder.test_train import small_set

pytestmark = pytest.mark.slow


def test_train_to_a_folder_then_eval_writes_the_documented_json(sketchy: Path, tmp_path: Path) -> None:
    data = small_set(sketchy, tmp_path)
    runner = CliRunner()
    out_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", str(data), "--model", "seed", "--epochs", "2", "--batch-size", "8", "--cache-views", "3",
         "--out", str(out_dir)],
    )
    assert result.exit_code == 0, result.output
    assert (out_dir / "model.pt").is_file()
    assert load_checkpoint(out_dir / "model.pt").train_config["cache_views"] == 3

    report_path = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(data), "--model", str(out_dir), "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "acc@1" in result.output and "mAP@all" in result.output
    report = json.loads(report_path.read_text())
    assert set(report) == {"model", "gallery", "queries", "instance", "category", "threshold", "seconds"}
    assert set(report["instance"]) == {"queries", "acc@1", "acc@3", "acc@5", "acc@10", "median_rank"}
    assert set(report["category"]) == {"mAP@all", "P@100"}
    assert set(report["threshold"]) == {"value", "recall", "precision"}
    assert set(report["seconds"]) == {"embed", "total"}
    assert report["gallery"] == 12 and report["queries"] == 12 and report["instance"]["queries"] == 12
    assert report["model"].startswith("sketchsearch-seed-v1-")
    for key in ("acc@1", "acc@3", "acc@5", "acc@10"):
        assert 0.0 <= report["instance"][key] <= 1.0
    assert report["category"]["mAP@all"] > 0

    # eval ranks as search does (photos blended with their nearest photos); 0 ranks by the embeddings alone
    assert re.search(r"gallery neighbours\s+5\n", result.output)
    plain_path = tmp_path / "plain.json"
    result = runner.invoke(
        app, ["eval", str(data), "--model", str(out_dir), "--gallery-neighbours", "0", "--json", str(plain_path)]
    )
    assert result.exit_code == 0, result.output
    assert "0 (embeddings alone)" in result.output
    embedder = load_embedder(str(out_dir))
    for path, k in ((report_path, 5), (plain_path, 0)):
        want = evaluate_dataset(data, embedder, neighbours=k)
        got = json.loads(path.read_text())
        assert want.category is not None
        assert got["category"]["mAP@all"] == pytest.approx(want.category.map_all, abs=1e-6)
        assert got["instance"]["acc@1"] == pytest.approx(want.instance.acc[1], abs=1e-6)


def test_eval_of_a_folder_without_the_layout_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "Sketchy layout" in result.output


def test_eval_with_an_unknown_model_is_a_clear_error(sketchy: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", str(sketchy), "--model", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_a_gallery_photo_that_cannot_be_read_stops_eval_and_whiten_validation(sketchy: Path, tmp_path: Path) -> None:
    """The metrics index the gallery by position: a skipped photo would shift every photo after it, so a truncated
    file is a clear error that names it, not a silently wrong score."""
    data = small_set(sketchy, tmp_path)
    victim = sorted((data / "photo" / "chair").glob("*.jpg"))[1]
    raw = victim.read_bytes()
    victim.unlink()  # a symlink into the shared data: replace it, never write through it
    victim.write_bytes(raw[: len(raw) // 3])
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(data)])
    assert result.exit_code == 2 and "could not be read" in result.output and victim.name in result.output
    assert result.output.count(victim.name) == 1  # named once, not by the error and its reason each
    from encoder.checkpoint import save_checkpoint

    plain = save_checkpoint(
        load_checkpoint("default").without_pooled_join().without_whitening(), tmp_path / "plain.pt"
    )
    result = runner.invoke(
        app, ["whiten", str(data), "--model", str(plain), "--holdout", "chair", "--out", str(tmp_path / "w.pt")]
    )
    assert result.exit_code == 2 and "could not be read" in result.output and victim.name in result.output
    assert not (tmp_path / "w.pt").exists()


def test_train_command_defaults_are_the_train_config_defaults() -> None:
    """The CLI restates TrainConfig's defaults (importing torch to read them would slow every command): keep them
    equal, so that `sketchsearch train` with no flags trains the shipped settings."""
    import dataclasses
    import inspect

    from encoder.train import TrainConfig
    from services.cli import train_command

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    renamed = {
        "last_epoch": ("select_best", lambda v: not v),
        "separate_heads": ("shared_head", lambda v: not v),
        "joined_loss": ("joined_loss", lambda v: v is not False),  # None: on wherever there is a join
    }
    checked = 0
    for name, param in inspect.signature(train_command).parameters.items():
        if param.default is inspect.Parameter.empty or name in (
            "threshold", "cache_dir", "out", "name", "val", "gallery_neighbours"
        ):
            continue
        target, convert = renamed.get(name, (name, lambda v: v))
        if target in fields:
            assert convert(param.default) == fields[target], f"--{name.replace('_', '-')}: {param.default!r}"
            checked += 1
    assert checked >= 15
    assert fields["epochs"] == 8 and fields["embed_dim"] == 512 and fields["ce_weight"] == 1.0
    assert fields["whiten_power"] == 0.25 and fields["joined_loss"] is True
    # --gallery-neighbours defaults to the setting search and eval rank with, which TrainConfig restates
    from services.config import Settings

    assert fields["gallery_neighbours"] == Settings.model_fields["gallery_neighbours"].default == 5


def test_train_refuses_the_joined_loss_without_a_join(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", str(tmp_path), "--joined-loss", "--pooled-weight", "0", "--out", str(tmp_path / "x.pt")]
    )
    assert result.exit_code == 2 and "needs --pooled-weight above 0" in result.output
    assert not (tmp_path / "x.pt").exists()
    # left at its default, the joined loss does not stand in the way of --pooled-weight 0: the data is next
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--pooled-weight", "0", "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "Sketchy layout" in result.output


def test_whiten_fits_a_new_model_and_refuses_to_whiten_twice(sketchy: Path, tmp_path: Path) -> None:
    from encoder.checkpoint import save_checkpoint

    data = small_set(sketchy, tmp_path)
    # the shipped weights without their join and whitening: a trained model as `train --whiten-power 0
    # --pooled-weight 0` leaves it
    plain = load_checkpoint("default").without_pooled_join().without_whitening()
    assert not plain.config.whiten and not any(k.startswith("whiten_") for k in plain.state_dict)
    source = save_checkpoint(plain, tmp_path / "plain.pt")
    out = tmp_path / "white.pt"
    runner = CliRunner()
    result = runner.invoke(
        app, ["whiten", str(data), "--model", str(source), "--holdout", "chair", "--out", str(out), "--power", "0.5"]
    )
    assert result.exit_code == 0, result.output
    white = load_checkpoint(out)
    assert white.config.whiten and white.model_id != plain.model_id
    assert white.train_config["whiten_power"] == 0.5
    assert white.metrics["whitening"]["holdout"] == ["chair"]
    # fitted on the 8 paired sketches and 8 photos of the other two categories, validated on the held-out one
    assert white.metrics["whitening"]["sketches"] == 8 and white.metrics["whitening"]["photos"] == 8
    assert set(white.metrics["validation"]) == {"data"}
    assert white.metrics["validation"]["data"]["instance"]["queries"] == 4
    # calibrated on gallery vectors (5 neighbours, the setting's default), as eval ranks; validated both ways
    gallery = white.metrics["validation_gallery"]["data"]
    assert white.metrics["threshold_neighbours"] == 5 and white.threshold == gallery["threshold"]["value"]
    assert gallery["threshold"]["value"] != white.metrics["validation"]["data"]["threshold"]["value"]
    assert "(gallery neighbours 5)" in result.output
    assert load_checkpoint(source).config.whiten is False  # the input is left as it was

    again = runner.invoke(app, ["whiten", str(data), "--model", str(out), "--out", str(tmp_path / "twice.pt")])
    assert again.exit_code == 2 and "already whitened" in again.output

    # with nothing to calibrate on and no --threshold, the unwhitened threshold would be on the wrong scale
    unscaled = tmp_path / "unscaled.pt"
    result = runner.invoke(app, ["whiten", str(data), "--model", str(source), "--out", str(unscaled)])
    assert result.exit_code == 2 and "no threshold" in result.output and "--threshold" in result.output
    assert not unscaled.exists()
    result = runner.invoke(
        app, ["whiten", str(data), "--model", str(source), "--out", str(unscaled), "--threshold", "0.3"]
    )
    assert result.exit_code == 0, result.output
    given = load_checkpoint(unscaled)
    assert given.threshold == 0.3 and "validation" not in given.metrics and "validation_unwhitened" in given.metrics


def test_join_pooled_writes_a_wider_model_and_refuses_to_join_twice(sketchy: Path, tmp_path: Path) -> None:
    from encoder.checkpoint import save_checkpoint

    data = small_set(sketchy, tmp_path)
    # the shipped model before its join; the join's own statistics and settings go with it
    shipped = load_checkpoint("default")
    base = shipped.without_pooled_join()
    assert base.dim == shipped.config.embed_dim and not any(k.startswith("pooled_") for k in base.state_dict)
    source = save_checkpoint(base, tmp_path / "base.pt")
    (data / "photo" / "apple" / "zz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # left out of the fit
    out = tmp_path / "joined.pt"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["join-pooled", str(data), "--model", str(source), "--holdout", "chair", "--weight", "0.75", "--dims", "6",
         "--gallery-neighbours", "0", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    joined = load_checkpoint(out)
    assert joined.dim == base.dim + 6 and f"{joined.dim} dimensions" in result.output
    assert joined.model_id != base.model_id and joined.config.whiten  # joined after the shipped whitening
    assert joined.train_config["pooled_weight"] == 0.75 and joined.metrics["pooled_join"]["holdout"] == ["chair"]
    # fitted on the 8 paired sketches and 8 readable photos of the other two categories, validated on the held-out one
    assert joined.metrics["pooled_join"]["sketches"] == 8 and joined.metrics["pooled_join"]["photos"] == 8
    # --gallery-neighbours 0: calibrated on the embeddings alone
    assert joined.threshold == joined.metrics["validation"]["data"]["threshold"]["value"]
    assert joined.metrics["threshold_neighbours"] == 0 and "validation_gallery" not in joined.metrics
    embedder = load_embedder(out, backend="onnx", cache_dir=tmp_path / "onnx")
    photos = sorted((data / "photo" / "chair").glob("*.jpg"))
    vectors = embedder.embed_photo_files(photos).vectors
    assert vectors.shape == (len(photos), joined.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    again = runner.invoke(app, ["join-pooled", str(data), "--model", str(out), "--out", str(tmp_path / "twice.pt")])
    assert again.exit_code == 2 and "already joins" in again.output
    white = runner.invoke(app, ["whiten", str(data), "--model", str(out), "--out", str(tmp_path / "w.pt")])
    assert white.exit_code == 2 and "whiten the model before the join" in white.output

    # --refit fits again from the trained weights: the join alone, or the whitening with the join dropped
    rejoined = tmp_path / "rejoined.pt"
    result = runner.invoke(
        app, ["join-pooled", str(data), "--model", str(out), "--holdout", "chair", "--dims", "4", "--refit",
              "--out", str(rejoined)],
    )
    assert result.exit_code == 0, result.output
    again_joined = load_checkpoint(rejoined)
    assert again_joined.dim == base.dim + 4 and again_joined.config.whiten
    assert again_joined.train_config["pooled_weight"] == 0.5
    rewhite = tmp_path / "rewhite.pt"
    result = runner.invoke(
        app, ["whiten", str(data), "--model", str(out), "--holdout", "chair", "--refit", "--out", str(rewhite)]
    )
    assert result.exit_code == 0, result.output
    white_again = load_checkpoint(rewhite)
    assert white_again.config.whiten and white_again.config.pooled_weight == 0 and white_again.dim == base.dim
    assert not any(k.startswith("pooled_") for k in white_again.state_dict)


def failed_cleanly(result: Result, *expected: str) -> bool:
    """Exit code 2 from the CLI's own error (an `error:` line holding every expected text), not an exception."""
    return (
        result.exit_code == 2
        and isinstance(result.exception, SystemExit)
        and "error: " in result.output
        and all(text in result.output for text in expected)
    )


def test_train_and_whiten_check_their_output_before_any_work(sketchy: Path, tmp_path: Path) -> None:
    """A bad --out used to fail only when saving, after the whole run, and whiten overwrote any file."""
    data = small_set(sketchy, tmp_path)
    runner = CliRunner()
    train = ["train", str(data), "--model", "seed", "--epochs", "1", "--batch-size", "8", "--cache-dir",
             str(tmp_path / "cache")]
    result = runner.invoke(app, [*train, "--out", "/proc/sketchsearch-test.pt"])
    assert failed_cleanly(result, "cannot write the checkpoint to /proc/sketchsearch-test.pt"), result.output
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    result = runner.invoke(app, [*train, "--out", str(notes)])  # not .pt: a folder to hold model.pt
    assert failed_cleanly(result, f"{notes} is a file, not a folder"), result.output
    text_pt = tmp_path / "notes.pt"
    text_pt.write_text("my notes")
    result = runner.invoke(app, [*train, "--out", str(text_pt)])
    assert failed_cleanly(result, "is not a sketchsearch checkpoint: not overwriting it"), result.output
    assert not (tmp_path / "cache").exists()  # refused before a single image was cached
    result = runner.invoke(app, ["whiten", str(data), "--holdout", "chair", "--out", str(notes)])
    assert failed_cleanly(result, "is not a sketchsearch checkpoint: not overwriting it"), result.output
    result = runner.invoke(app, ["join-pooled", str(data), "--holdout", "chair", "--out", "/proc/x.pt"])
    assert failed_cleanly(result, "cannot write the checkpoint to /proc/x.pt"), result.output
    assert notes.read_text() == "my notes" and text_pt.read_text() == "my notes"


def test_train_refuses_bad_settings_and_data_before_caching(sketchy: Path, tmp_path: Path) -> None:
    data = small_set(sketchy, tmp_path, per_category=3)
    runner = CliRunner()
    cache = tmp_path / "cache"
    out = tmp_path / "run"

    def train(*args: str) -> Result:
        return runner.invoke(app, ["train", *args, "--model", "seed", "--cache-dir", str(cache), "--out", str(out)])

    for option, value in (("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"), ("--batch-size", "3")):
        result = train(str(data), option, value)
        assert result.exit_code == 2 and "Invalid value" in result.output and option in result.output
    result = train(str(data), "--holdout", "zebra")
    assert failed_cleanly(result, "unknown held-out category zebra", "apple, cat, chair"), result.output
    result = train(str(data), "--holdout", "apple,zebra")  # zebra used to be dropped silently
    assert failed_cleanly(result, "unknown held-out category zebra:"), result.output
    result = train(str(data), str(tmp_path / "missing"))
    assert failed_cleanly(result, "no such folder", "missing"), result.output
    (tmp_path / "emptycat" / "photo").mkdir(parents=True)
    result = train(str(tmp_path / "emptycat"))
    assert failed_cleanly(result, "no photos or sketches to train on"), result.output
    # one category of three photos: batches need 4 distinct ones, so every epoch would train on nothing
    result = train(str(data), "--holdout", "apple,cat", "--epochs", "8", "--batch-size", "4")
    assert failed_cleanly(result, "too few pairs to train on: 3 sketch/photo pairs of 3 distinct photos"), result.output
    assert not cache.exists() and not (out / "model.pt").exists()  # (the folder is made: it was checked)


def test_train_batch_size_minimum_is_the_trainers() -> None:
    """The CLI restates MIN_BATCH (importing torch for a usage error would slow every command)."""
    import typing

    from encoder.train import MIN_BATCH
    from services.cli import train_command

    hints = typing.get_type_hints(train_command, include_extras=True)
    (option,) = [m for m in hints["batch_size"].__metadata__ if hasattr(m, "min")]
    assert option.min == MIN_BATCH


def test_whiten_holdout_of_an_unknown_category_is_named(sketchy: Path, tmp_path: Path) -> None:
    from encoder.checkpoint import save_checkpoint

    data = small_set(sketchy, tmp_path)
    plain = save_checkpoint(load_checkpoint("default").without_pooled_join().without_whitening(), tmp_path / "p.pt")
    result = CliRunner().invoke(
        app, ["whiten", str(data), "--model", str(plain), "--holdout", "zebra", "--out", str(tmp_path / "w.pt")]
    )
    # it used to ask for held-out categories, which had been given
    assert failed_cleanly(result, "unknown held-out category zebra", "apple, cat, chair"), result.output
    assert "give held-out categories" not in result.output and not (tmp_path / "w.pt").exists()


def test_a_blank_sketch_is_named_in_eval_and_train(sketchy: Path, tiny_model: Path, tmp_path: Path) -> None:
    from PIL import Image

    data = small_set(sketchy, tmp_path)
    stem = sorted((data / "photo" / "cat").glob("*.jpg"))[0].stem
    blank = data / "sketch" / "cat" / f"{stem}-9.png"  # paired with a photo, so training reads it too
    Image.new("L", (64, 64), 255).save(blank)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(data), "--model", str(tiny_model), "--gallery-neighbours", "0"])
    assert failed_cleanly(result, f"{blank}: the sketch is empty"), result.output
    result = runner.invoke(
        app, ["train", str(data), "--model", "seed", "--epochs", "1", "--out", str(tmp_path / "m.pt")]
    )
    assert failed_cleanly(result, f"{blank}: the sketch is empty"), result.output
    assert result.output.count(str(blank)) == 1


def test_eval_checks_its_json_path_and_categories_first(sketchy: Path, tiny_model: Path, tmp_path: Path) -> None:
    data = small_set(sketchy, tmp_path)
    (tmp_path / "file").write_text("")
    runner = CliRunner()
    for target, reason in (
        ("/proc/sketchsearch.json", "cannot create a file in /proc"),
        (str(tmp_path), "it is a folder"),
        (str(tmp_path / "file" / "r.json"), "is a file, not a folder"),
    ):
        result = runner.invoke(app, ["eval", str(data), "--model", str(tiny_model), "--json", target])
        assert failed_cleanly(result, "cannot write the JSON report", reason), result.output
        assert "acc@1" not in result.output  # refused before evaluating, not after
    result = runner.invoke(app, ["eval", str(data), "--model", str(tiny_model), "--categories", "apple,zebra"])
    assert failed_cleanly(result, "unknown requested category zebra", "apple, cat, chair"), result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "missing"), "--model", str(tiny_model)])
    assert failed_cleanly(result, "missing: no such folder"), result.output
