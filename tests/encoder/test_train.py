"""Training on a handful of real shared images lowers the loss; checkpoints round-trip with weights_only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.checkpoint import load_checkpoint, save_checkpoint
from encoder.data import SketchyDataset, load_dataset
from encoder.embedder import load_embedder
from encoder.errors import DatasetError, EmptySketchError, ModelLoadError, SketchSearchError
from encoder.model import ModelConfig, SketchPhotoEncoder, load_imagenet_classifier, load_imagenet_weights
from encoder.preprocess import Preprocessing
from encoder.train import (
    MIN_BATCH,
    Stages,
    TrainConfig,
    ViewLoader,
    build_cache,
    draw_views,
    info_nce_loss,
    photo_input,
    relation_loss,
    sketch_input,
    teacher_features,
    teacher_logits,
    train,
    triplet_loss,
    validation_keys,
    view_mirror,
)

CATEGORIES = ["apple", "cat", "chair"]


def small_set(sketchy: Path, tmp_path: Path, per_category: int = 4, categories: list[str] = CATEGORIES) -> Path:
    """A Sketchy-layout folder of symlinks to a few real photos and their sketches (nothing copied)."""
    root = tmp_path / "data"
    for category in categories:
        by_photo: dict[str, Path] = {}
        for sketch in sorted((sketchy / "sketch" / category).glob("*.png")):
            by_photo.setdefault(sketch.stem.rsplit("-", 1)[0], sketch)
        for sketch in list(by_photo.values())[:per_category]:
            stem = sketch.stem.rsplit("-", 1)[0]
            for kind, src in (("sketch", sketch), ("photo", sketchy / "photo" / category / f"{stem}.jpg")):
                dst = root / kind / category / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    dst.symlink_to(src)
    return root


def test_triplet_loss_prefers_matched_pairs() -> None:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert float(triplet_loss(a, a, 0.2, "hardest")) < float(triplet_loss(a, a.roll(1, 0), 0.2, "hardest"))
    assert float(triplet_loss(a, a, 0.2, "semihard")) >= 0
    assert float(info_nce_loss(a, a, 0.07)) < float(info_nce_loss(a, a.roll(1, 0), 0.07))


def test_relation_loss_is_zero_for_the_teachers_own_similarities() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(10, 32), dim=1)
    raw = torch.randn(10, 16, requires_grad=True)
    assert float(relation_loss(teacher, teacher, 0.1)) < 1e-6
    loss = relation_loss(torch.nn.functional.normalize(raw, dim=1), teacher, 0.1)
    assert float(loss.detach()) > 0.1
    loss.backward()  # the student's similarities get a gradient toward the teacher's
    assert raw.grad is not None and float(raw.grad.abs().sum()) > 0
    # the same vectors in another order: each row's neighbours are no longer the teacher's
    assert float(relation_loss(teacher.roll(1, 0), teacher, 0.1)) > 0.1
    assert float(relation_loss(teacher[:2], teacher[:2], 0.1)) == 0.0  # too few photos to compare


def test_mirror_pairs_mirror_a_sketch_and_its_photo_together(sketchy: Path) -> None:
    """With mirror_pairs, odd views are mirrored and even ones not, and a pair's two views share a parity."""
    import random

    prep = Preprocessing(image_size=96)
    sketch = sorted((sketchy / "sketch" / "apple").glob("*.png"))[0]
    photo = sorted((sketchy / "photo" / "apple").glob("*.jpg"))[0]
    for path, make in ((sketch, sketch_input), (photo, photo_input)):
        plain = make(path, prep, random.Random(5), view_mirror(2, True))
        mirrored = make(path, prep, random.Random(5), view_mirror(3, True))
        assert np.allclose(mirrored, plain[:, :, ::-1])  # the same affine draw, then mirrored
        assert not np.allclose(mirrored, plain)
    assert view_mirror(1, False) is None  # without mirror_pairs each view flips its own coin

    sk, ph = draw_views(400, 4, True, random.Random(0))
    assert all(a % 2 == b % 2 for a, b in zip(sk, ph, strict=True)) and set(ph) == {0, 1, 2, 3}
    sk, ph = draw_views(400, 4, False, random.Random(0))
    assert any(a % 2 != b % 2 for a, b in zip(sk, ph, strict=True))


@pytest.mark.slow
def test_seed_model_training_lowers_the_loss(sketchy: Path, tmp_path: Path) -> None:
    data = small_set(sketchy, tmp_path)
    cfg = TrainConfig(model="seed", epochs=12, batch_size=8, lr=3e-3, cache_views=1, seed=1)
    ckpt = train([data], cfg, tmp_path / "seed.pt", progress=False)
    # the loss on fixed training batches, before and after training
    assert ckpt.metrics["history"][-1]["probe_loss"] < 0.9 * ckpt.metrics["initial_probe_loss"]
    assert ckpt.config.arch == "seed" and ckpt.dim == 128
    # the seed network has no pooled vector to join: its record says the loss was on the embedding
    assert ckpt.train_config["joined_loss"] is False


@pytest.mark.slow
def test_lite_training_step_lowers_the_loss_and_round_trips(sketchy: Path, tmp_path: Path) -> None:
    data = small_set(sketchy, tmp_path)
    cfg = TrainConfig(
        model="lite0",
        epochs=4,
        batch_size=12,
        lr=1e-3,
        trunk_lr=3e-4,
        cache_views=1,
        seed=2,
        holdout=["chair"],
        train_from_block=14,
        kd_weight=1.0,
        rkd_weight=1.0,
        whiten_power=0.25,
        pooled_weight=0.5,
        pooled_dims=8,
        pooled_ce_weight=1.0,
        joined_loss=True,
    )
    out = tmp_path / "lite.pt"
    ckpt = train([data], cfg, out, progress=False)
    assert ckpt.metrics["history"][-1]["probe_loss"] < ckpt.metrics["initial_probe_loss"]
    assert "data" in ckpt.metrics["validation"]  # validated on the held-out category
    # whitened after training, and validated again: the whitening changes the scores
    assert ckpt.config.whiten
    before, after = ckpt.metrics["validation_unwhitened"]["data"], ckpt.metrics["validation_unjoined"]["data"]
    assert before["threshold"]["value"] != after["threshold"]["value"]
    assert ckpt.threshold is not None
    # then the pooled vector joined, validated once more: 8 principal directions beside the 512-d embedding
    assert ckpt.config.pooled_weight == 0.5 and ckpt.dim == 520
    assert ckpt.metrics["validation"]["data"]["threshold"]["value"] != after["threshold"]["value"]
    # the stored threshold is calibrated on gallery vectors (5 neighbours, the default), as eval and search rank
    gallery = ckpt.metrics["validation_gallery"]["data"]
    assert ckpt.metrics["threshold_neighbours"] == 5 and ckpt.threshold == gallery["threshold"]["value"]
    assert gallery["threshold"]["value"] != ckpt.metrics["validation"]["data"]["threshold"]["value"]

    # the checkpoint loads with weights_only=True and rebuilds the same model, the same id, the same outputs
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["config"]["arch"] == "lite0" and raw["preprocessing"]["image_size"] == 192
    loaded = load_checkpoint(out)
    assert loaded.model_id == ckpt.model_id and loaded.config.whiten and loaded.dim == 520
    assert loaded.categories == ["apple", "cat"]
    sketch = sorted((data / "sketch" / "chair").glob("*.png"))[0]
    a = load_embedder(out, backend="torch").embed_sketches([sketch])
    b = load_embedder(out, backend="onnx", cache_dir=tmp_path / "onnx").embed_sketches([sketch])
    assert np.abs(a - b).max() < 1e-4

    # fp16 storage keeps the id stable and the embeddings close
    half = save_checkpoint(loaded, tmp_path / "half.pt", half=True)
    assert load_checkpoint(half).model_id == ckpt.model_id
    assert half.stat().st_size < 0.6 * out.stat().st_size
    c = load_embedder(half, backend="torch").embed_sketches([sketch])
    assert float((a * c).sum()) > 0.999


@pytest.mark.slow
def test_teacher_logits_from_cached_features_are_the_imagenet_networks(sketchy: Path) -> None:
    """The distillation targets, computed from the frozen front's cache, match the whole pretrained network."""
    model = SketchPhotoEncoder(ModelConfig(image_size=192))
    load_imagenet_weights(model.trunk, "lite0")
    model.eval()
    prep = Preprocessing(image_size=192)
    paths = sorted((sketchy / "photo" / "apple").glob("*.jpg"))[:3]
    def loader(path: Path) -> ViewLoader:
        return lambda rng, view: photo_input(path, prep, rng)

    items = [(p, loader(p)) for p in paths]
    stages = Stages(model, 11)
    cache = build_cache(stages, items, 1, 0, torch.device("cpu"), "test", "photo")
    from_cache = teacher_logits(model, 11, cache, torch.device("cpu"))[:, 0].float()

    weight, bias = load_imagenet_classifier("lite0")
    with torch.no_grad():
        x = torch.from_numpy(np.stack([photo_input(p, prep, None) for p in paths]))
        final, _ = model.trunk.forward_blocks(model.trunk.stem(x), 0, ())
        direct = final.mean(dim=(2, 3)) @ weight.t() + bias
    assert from_cache.shape == (3, 1000)
    assert torch.allclose(from_cache, direct, atol=0.05, rtol=0.01)  # the cache and the targets are fp16
    assert (from_cache.argmax(1) == direct.argmax(1)).all()

    # the relational targets: the same network's pooled features, centred on their mean and normalised
    features = teacher_features(model, 11, cache, torch.device("cpu"))[:, 0].float()
    with torch.no_grad():
        pooled = final.mean(dim=(2, 3))
    expected = torch.nn.functional.normalize(pooled - pooled.mean(0), dim=1)
    assert features.shape == (3, 1280)
    assert torch.allclose(features, expected, atol=0.01)


def test_missing_or_foreign_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"hello": 1}, foreign)
    with pytest.raises(ModelLoadError, match="not a sketchsearch checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(ModelLoadError):
        load_checkpoint(garbage)


def test_training_needs_the_sketchy_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Sketchy layout"):
        train([tmp_path], TrainConfig(model="seed", epochs=1), tmp_path / "x.pt", progress=False)


@pytest.mark.slow
def test_frozen_photo_trunk_keeps_imagenet_weights_and_exports(sketchy: Path, tmp_path: Path) -> None:
    """--frozen-photo-trunk: the photos' trunk leaves training with its ImageNet weights, the sketches' does not,
    and the photo branch still exports to ONNX within tolerance."""
    data = small_set(sketchy, tmp_path)
    cfg = TrainConfig(
        model="lite0", epochs=2, batch_size=12, lr=1e-3, trunk_lr=3e-4, cache_views=1, seed=3,
        train_from_block=14, frozen_photo_trunk=True, whiten_power=0.0,
    )
    out = tmp_path / "frozen.pt"
    ckpt = train([data], cfg, out, progress=False)
    assert ckpt.metrics["history"][-1]["probe_loss"] < ckpt.metrics["initial_probe_loss"]
    imagenet = SketchPhotoEncoder(ModelConfig(image_size=192))
    load_imagenet_weights(imagenet.trunk, "lite0")
    reference = imagenet.trunk.state_dict()
    trained = load_checkpoint(out).build()
    assert isinstance(trained, SketchPhotoEncoder) and trained.photo_trunk is not None
    for key, value in trained.photo_trunk.state_dict().items():
        assert torch.allclose(value.float(), reference[key].float()), key
    tuned = trained.trunk.state_dict()
    assert not torch.allclose(tuned["_conv_head.weight"], reference["_conv_head.weight"])
    photo = sorted((data / "photo" / "apple").glob("*.jpg"))[:2]
    a = load_embedder(out, backend="torch").embed_photo_files(photo).vectors
    b = load_embedder(out, backend="onnx", cache_dir=tmp_path / "onnx").embed_photo_files(photo).vectors
    assert np.abs(a - b).max() < 1e-4


def placeholder_set(root: Path, photos: dict[str, int]) -> Path:
    """A Sketchy-layout folder of empty files: `photos[c]` photos of category c, each with two sketches. Enough
    for whatever train() checks before it reads an image (a test that reads one would fail on these)."""
    for category, count in photos.items():
        for k in range(count):
            for kind, name in (("photo", f"p{k}.jpg"), ("sketch", f"p{k}-1.png"), ("sketch", f"p{k}-2.png")):
                (root / kind / category).mkdir(parents=True, exist_ok=True)
                (root / kind / category / name).write_bytes(b"")
    return root


def test_train_checks_settings_data_and_output_before_reading_an_image(tmp_path: Path) -> None:
    """Every mistake here used to surface only after caching and training, or never: the data are empty files,
    so reaching the images at all would fail differently."""
    data = placeholder_set(tmp_path / "data", {"ant": 3, "cat": 3})
    out = tmp_path / "runs" / "model.pt"

    def attempt(**changes: object) -> None:
        settings: dict[str, object] = {"model": "seed", "epochs": 1, "batch_size": 8, **changes}
        target = settings.pop("out", out)
        dirs = settings.pop("dirs", [data])
        train(dirs, TrainConfig(**settings), target, progress=False)  # type: ignore[arg-type]

    with pytest.raises(SketchSearchError, match="epochs must be at least 1"):
        attempt(epochs=0)
    with pytest.raises(SketchSearchError, match=f"batch size must be at least {MIN_BATCH}"):
        attempt(batch_size=MIN_BATCH - 1)
    with pytest.raises(SketchSearchError, match="cache_views must be at least 1"):
        attempt(cache_views=0)
    # the output: a place where no file can be made, a file where a folder must be, someone else's file
    with pytest.raises(SketchSearchError, match="cannot write the checkpoint"):
        attempt(out=Path("/proc/sketchsearch-test.pt"))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(SketchSearchError, match="notes.txt is a file, not a folder"):
        attempt(out=notes / "model.pt")
    text_pt = tmp_path / "notes.pt"
    text_pt.write_text("keep me too")
    with pytest.raises(SketchSearchError, match="not a sketchsearch checkpoint: not overwriting"):
        attempt(out=text_pt)
    assert notes.read_text() == "keep me" and text_pt.read_text() == "keep me too"
    # a misspelt folder beside a good one, and held-out categories the data does not have
    with pytest.raises(DatasetError, match="no such folder: .*missing"):
        attempt(dirs=[data, tmp_path / "missing"])
    with pytest.raises(DatasetError, match="unknown held-out category zebra: the data's categories are ant, cat"):
        attempt(holdout=["ant", "zebra"])
    (tmp_path / "empty" / "photo").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no photos or sketches to train on"):
        attempt(dirs=[tmp_path / "empty"])
    # three photos cannot make a batch of MIN_BATCH distinct ones: every epoch would be empty, the model untrained
    with pytest.raises(DatasetError, match="too few pairs to train on: 6 sketch/photo pairs of 3 distinct photos"):
        attempt(holdout=["cat"])
    assert not out.exists()


def test_save_checkpoint_failures_are_clear_errors(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(tiny_model)
    with pytest.raises(SketchSearchError, match="cannot write the checkpoint /proc/x.pt: No such file"):
        save_checkpoint(ckpt, "/proc/x.pt")  # torch's RuntimeError, not a traceback
    (tmp_path / "file").write_text("")
    with pytest.raises(SketchSearchError, match="cannot write the checkpoint"):
        save_checkpoint(ckpt, tmp_path / "file" / "model.pt")  # an OSError
    # a checkpoint is ours to replace
    saved = save_checkpoint(ckpt, tmp_path / "model.pt")
    from encoder.train import check_checkpoint_output

    check_checkpoint_output(saved)


def test_a_blank_or_unreadable_sketch_is_named_once(tiny_model: Path, tmp_path: Path) -> None:
    from PIL import Image

    from encoder.embedder import Embedder

    blank = tmp_path / "blank-1.png"
    Image.new("L", (64, 64), 255).save(blank)
    embedder = Embedder(load_checkpoint(tiny_model), backend="torch")
    with pytest.raises(EmptySketchError) as caught:
        embedder.embed_sketches([blank])
    assert str(caught.value).count(str(blank)) == 1 and "no strokes" in str(caught.value)
    with pytest.raises(EmptySketchError) as caught:
        sketch_input(blank, Preprocessing(image_size=64, channels=1), None)
    assert str(caught.value).count(str(blank)) == 1
    with pytest.raises(EmptySketchError, match="^the sketch is empty"):  # no file to name: as before
        embedder.embed_sketches([Image.new("L", (64, 64), 255)])
    junk = tmp_path / "junk-1.png"
    junk.write_text("not an image")
    with pytest.raises(SketchSearchError) as unreadable:
        embedder.embed_sketches([junk])
    assert str(unreadable.value).count(str(junk)) == 1  # PIL's message names it too
    assert str(unreadable.value).startswith(f"{junk}: ")


def test_validation_keys_stay_folder_names_unless_two_share_one(tmp_path: Path) -> None:
    def sets(*roots: str) -> list[SketchyDataset]:
        return [SketchyDataset(tmp_path / root, [], []) for root in roots]

    # the keys of the shipped checkpoints ('test', 'data') and of most runs: unchanged
    assert validation_keys(sets("data", "qmul-shoes/test")) == ["data", "test"]
    # two folders of one name no longer overwrite each other's results (nor calibrate on the wrong one)
    assert validation_keys(sets("v1/test", "v2/test", "data")) == ["v1/test", "v2/test", "data"]
    assert validation_keys(sets("a/v/test", "b/v/test")) == ["v/test#1", "v/test#2"]


def test_validation_of_two_folders_of_one_name_keeps_both(tiny_model: Path, sketchy: Path, tmp_path: Path) -> None:
    from encoder.train import _validate_checkpoint

    first = small_set(sketchy, tmp_path / "v1", per_category=2, categories=["apple", "cat"])
    second = small_set(sketchy, tmp_path / "v2", per_category=2, categories=["chair", "cat", "apple"])
    sets = [load_dataset(first.rename(first.parent / "test")), load_dataset(second.rename(second.parent / "test"))]
    plain, blended = _validate_checkpoint(load_checkpoint(tiny_model), sets, neighbours=1)
    assert list(plain) == list(blended) == ["v1/test", "v2/test"]
    # each key holds its own folder's results: 4 and 6 sketches
    assert [plain[k].instance.queries for k in plain] == [4, 6]


def test_data_paths_may_overlap_but_each_must_hold_a_set(tmp_path: Path) -> None:
    from encoder.errors import DatasetError
    from encoder.train import _discover_sets

    for name in ("a", "b"):
        (tmp_path / "data" / name / "photo").mkdir(parents=True)
    (tmp_path / "data" / "a" / "test" / "photo").mkdir(parents=True)  # found only when named directly
    (tmp_path / "nothing").mkdir()
    data = tmp_path / "data"
    # a folder named twice, or a set named beside the folder that holds it, trains on each set once
    assert _discover_sets([data, data / "a", data]) == [data / "a", data / "b"]
    with pytest.raises(DatasetError, match="nothing"):
        _discover_sets([data, tmp_path / "nothing"])
    with pytest.raises(DatasetError, match="no such folder"):
        _discover_sets([data, tmp_path / "missing"])
