"""Broken checkpoints are ModelLoadErrors that name the file and the problem, never tracebacks of other types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from encoder.checkpoint import WEIGHTS_DIR, Checkpoint, load_checkpoint
from encoder.errors import ModelLoadError

LITE0 = WEIGHTS_DIR / "sketchsearch-lite0.pt"
LITE1 = WEIGHTS_DIR / "sketchsearch-lite1.pt"


def _payload(path: Path = LITE0) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return payload


def _other_arch_weights(payload: dict[str, Any]) -> None:
    payload["state_dict"] = _payload(LITE1)["state_dict"]


def _some_weights_dropped(payload: dict[str, Any]) -> None:
    payload["state_dict"] = dict(list(payload["state_dict"].items())[10:])


def _set(section: str, key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload[section].update({key: value})


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "no name": (lambda p: p.pop("name"), "no 'name'"),
    "no config": (lambda p: p.pop("config"), "no 'config'"),
    "no weights": (lambda p: p.pop("state_dict"), "no 'state_dict'"),
    "empty weights": (lambda p: p.update(state_dict={}), "no weights"),
    "weights not tensors": (lambda p: p["state_dict"].update(extra=1.0), "not named tensors"),
    "some weights missing": (_some_weights_dropped, "10 missing"),
    "weights of another architecture": (_other_arch_weights, "of another shape"),
    "image size 0": (_set("preprocessing", "image_size", 0), "image_size 0"),
    "image size 0 in both": (lambda p: [p[s].update(image_size=0) for s in ("config", "preprocessing")], "below"),
    "unknown arch": (_set("config", "arch", "lite9"), "unknown architecture 'lite9'"),
    "config not a dict": (lambda p: p.update(config=[1, 2]), "config is a list"),
    "unknown config type": (_set("config", "embed_dim", "wide"), "does not build"),
    "channels": (_set("preprocessing", "channels", 1), "channels"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_checkpoint_is_a_model_load_error_naming_file_and_problem(case: str, tmp_path: Path) -> None:
    mutate, problem = BROKEN[case]
    payload = _payload()
    mutate(payload)
    path = tmp_path / "broken.pt"
    torch.save(payload, path)
    # some problems show when the file loads, the weights' fit when the model is built: both are the same error
    with pytest.raises(ModelLoadError) as caught:
        load_checkpoint(path).build()
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)
    assert not isinstance(caught.value, ValueError | KeyError | RuntimeError)  # the CLI shows those otherwise


def test_the_shipped_checkpoint_itself_loads_and_builds() -> None:
    ckpt = load_checkpoint(LITE0)
    assert ckpt.source == LITE0
    assert not ckpt.build().training


def test_a_checkpoint_made_in_memory_with_an_unknown_arch_is_a_model_load_error() -> None:
    ckpt = load_checkpoint(LITE0)
    bad = Checkpoint(name="odd", config=ckpt.config.__class__(arch="resnet"), preprocessing=ckpt.preprocessing,
                     state_dict=ckpt.state_dict)
    with pytest.raises(ModelLoadError, match="checkpoint 'odd'.*does not build"):
        bad.build()


@pytest.mark.parametrize(
    "content",
    [b"\x80\x04not a zip", b"", LITE0.read_bytes()[:4096], b"hi\n"],
    ids=["garbage", "empty", "truncated", "text"],
)
def test_an_unreadable_file_gives_a_clean_message_without_unsafe_advice(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a sketchsearch checkpoint") as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message
    # retrying with weights_only=False would run whatever code the file holds: never suggested
    assert "weights_only" not in message and "arbitrary code" not in message
    assert len(message) < 300
    assert not message.rstrip(")").endswith(tuple("0123456789"))  # not a bare number from the unpickler


def test_a_file_with_foreign_objects_names_them_without_loading_them(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"format": 1, "obj": torch.nn.Identity()}, path)
    with pytest.raises(ModelLoadError, match="refers to torch.nn.modules.linear.Identity") as caught:
        load_checkpoint(path)
    assert "weights_only" not in str(caught.value)
