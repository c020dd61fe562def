"""Metrics on constructed cases whose answers are known by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoder.data import PhotoRecord, SketchRecord, SketchyDataset
from encoder.metrics import (
    RetrievalMetrics,
    average_precision,
    calibrate_threshold,
    category_metrics,
    instance_metrics,
    instance_ranks,
    retrieval_metrics,
    threshold_metrics,
)


def test_instance_ranks_and_accuracy() -> None:
    sim = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # own photo 0 ranks 1
            [0.5, 0.4, 0.6, 0.1],  # own photo 1 ranks 3
            [0.2, 0.3, 0.1, 0.0],  # own photo 3 ranks 4
        ]
    )
    target = np.array([0, 1, 3])
    assert instance_ranks(sim, target).tolist() == [1, 3, 4]
    m = instance_metrics(sim, target, ks=(1, 3, 5))
    assert m.queries == 3
    assert m.acc == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 5: pytest.approx(1.0)}
    assert m.median_rank == 3


def test_ties_count_against_the_query() -> None:
    sim = np.array([[0.5, 0.5, 0.5]])
    assert instance_ranks(sim, np.array([0])).tolist() == [3]


def test_average_precision_known_values() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # relevant at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert average_precision(scores, np.array([True, False, True, False])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores, np.array([False, False, False, False])) == 0.0
    assert average_precision(scores, np.array([True, True, True, True])) == pytest.approx(1.0)


def test_category_map_and_precision() -> None:
    sim = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4]])
    query_cat = np.array([0, 0])
    gallery_cat = np.array([0, 0, 1, 1])
    m = category_metrics(sim, query_cat, gallery_cat, p_at=2)
    # query 0: perfect (AP 1, P@2 1); query 1: relevant at ranks 3 and 4: AP = (1/3 + 2/4) / 2, P@2 0
    assert m.map_all == pytest.approx((1 + (1 / 3 + 2 / 4) / 2) / 2)
    assert m.p_at_100 == pytest.approx(0.5)


def test_a_query_whose_category_has_no_photos_counts_as_zero() -> None:
    # two gallery photos of category 0 and one of 1; the third query is of category 2, which has none
    sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7], [0.5, 0.4, 0.3]])
    m = category_metrics(sim, np.array([0, 1, 2]), np.array([0, 0, 1]), p_at=2)
    assert m.map_all == pytest.approx(2 / 3) and m.p_at_100 == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_threshold_recall_precision_and_calibration() -> None:
    sim = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.7], [0.1, 0.2, 0.4]])
    target = np.array([0, 1, 2])
    m = threshold_metrics(sim, target, 0.5)
    # own photos above 0.5: queries 0 and 1 -> recall 2/3; returned: 0.9, 0.8, 0.7 -> precision 2/3
    assert m.recall == pytest.approx(2 / 3)
    assert m.precision == pytest.approx(2 / 3)
    t = calibrate_threshold(sim, target)
    best = threshold_metrics(sim, target, t)
    f1 = 2 * best.precision * best.recall / (best.precision + best.recall)
    assert f1 >= 2 * m.precision * m.recall / (m.precision + m.recall) - 1e-9


def test_retrieval_metrics_on_a_constructed_set_and_its_json_round_trip() -> None:
    # photos: a0, a1 (category a), b0 (b); sketches of a0, b0, and one of a photo not in the gallery (a9)
    root = Path("set")
    photos = [PhotoRecord(root / f"{c}{i}.jpg", c, f"{c}{i}") for c, i in (("a", 0), ("a", 1), ("b", 0))]
    sketches = [SketchRecord(root / f"{stem}-1.png", stem[0], stem) for stem in ("a0", "b0", "a9")]
    data = SketchyDataset(root, photos, sketches)
    # unit vectors: sketch a0 ranks a1 above its own a0 (rank 2); sketch b0 finds b0 first; a9 is no instance query
    photo = np.eye(3, dtype=np.float32)
    sketch = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    m = retrieval_metrics(sketch, photo, data, threshold=0.7)
    assert m.instance.queries == 2
    assert m.instance.acc == {1: 0.5, 3: 1.0, 5: 1.0, 10: 1.0} and m.instance.median_rank == 1.5
    # category APs: a0's sketch ranks a1, a0 first (1), b0's finds b0 (1), a9's ranks a0 first, a1 tied after (1)
    assert m.category is not None and m.map_all == pytest.approx(1.0)
    # own scores 0.6 and 1.0: recall 1/2 at 0.7; returned above 0.7: a1 (0.8) and b0 (1.0) -> precision 1/2
    assert (m.threshold.value, m.threshold.recall, m.threshold.precision) == (0.7, 0.5, 0.5)
    stored = m.to_json()
    assert set(stored) == {"instance", "category", "threshold"}
    assert set(stored["instance"]) == {"queries", "acc@1", "acc@3", "acc@5", "acc@10", "median_rank"}
    assert stored["category"] == {"mAP@all": m.map_all, "P@100": m.category.p_at_100}
    assert RetrievalMetrics.from_json(stored) == m
    # one category: no category measure, stored as null
    single = data.subset(categories={"a"})
    one = retrieval_metrics(sketch[[0, 2]], photo[:2], single, threshold=0.7)
    assert one.category is None and one.to_json()["category"] is None and np.isnan(one.map_all)
    assert RetrievalMetrics.from_json(one.to_json()) == one
