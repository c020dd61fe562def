"""Retrieval metrics: instance acc@K and median rank, category mAP@all and P@100, threshold recall/precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from encoder.data import SketchyDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceMetrics:
    queries: int
    acc: dict[int, float]  # K -> share of queries whose own photo ranks within the top K
    median_rank: float

    def to_json(self) -> dict[str, Any]:
        acc = {f"acc@{k}": v for k, v in self.acc.items()}
        return {"queries": self.queries, **acc, "median_rank": self.median_rank}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceMetrics:
        acc = {int(key.removeprefix("acc@")): float(v) for key, v in data.items() if key.startswith("acc@")}
        return cls(int(data["queries"]), acc, float(data["median_rank"]))


@dataclass(frozen=True)
class CategoryMetrics:
    map_all: float
    p_at_100: float

    def to_json(self) -> dict[str, float]:
        return {"mAP@all": self.map_all, "P@100": self.p_at_100}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CategoryMetrics:
        return cls(float(data["mAP@all"]), float(data["P@100"]))


@dataclass(frozen=True)
class ThresholdMetrics:
    value: float
    recall: float  # share of queries whose own photo scores at or above the threshold (the study's measure)
    precision: float  # share of photos at or above the threshold that are the query's own photo

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "recall": self.recall, "precision": self.precision}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ThresholdMetrics:
        return cls(float(data["value"]), float(data["recall"]), float(data["precision"]))


@dataclass(frozen=True)
class RetrievalMetrics:
    """Sketches ranked against a gallery: the instance, category (None with one category) and threshold measures;
    `to_json` gives the keys of eval's JSON and of a checkpoint's stored validation."""

    instance: InstanceMetrics
    category: CategoryMetrics | None
    threshold: ThresholdMetrics

    @property
    def map_all(self) -> float:
        """mAP@all, NaN where there is no category measure."""
        return self.category.map_all if self.category else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance.to_json(),
            "category": self.category.to_json() if self.category else None,
            "threshold": self.threshold.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrievalMetrics:
        category = data.get("category")
        return cls(
            InstanceMetrics.from_json(data["instance"]),
            CategoryMetrics.from_json(category) if category else None,
            ThresholdMetrics.from_json(data["threshold"]),
        )


def instance_ranks(sim: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each query's own photo (target[i] = gallery index); ties count against the query."""
    own = sim[np.arange(len(target)), target]
    return (sim >= own[:, None]).sum(axis=1)


def instance_metrics(
    sim: np.ndarray, target: np.ndarray, ks: tuple[int, ...] = (1, 3, 5, 10)
) -> InstanceMetrics:
    if len(target) == 0:
        return InstanceMetrics(0, {k: 0.0 for k in ks}, float("nan"))
    ranks = instance_ranks(sim, target)
    return InstanceMetrics(
        queries=len(target),
        acc={k: float(np.mean(ranks <= k)) for k in ks},
        median_rank=float(np.median(ranks)),
    )


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of one ranking over the whole gallery (mAP@all's term)."""
    n_rel = int(relevant.sum())
    if n_rel == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order].astype(np.float64)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / n_rel)


def category_metrics(
    sim: np.ndarray, query_cat: np.ndarray, gallery_cat: np.ndarray, p_at: int = 100
) -> CategoryMetrics:
    """mAP@all and P@K over every query; one whose category has no photo in the gallery counts as 0 in both."""
    aps, precisions = [], []
    for i in range(sim.shape[0]):
        relevant = gallery_cat == query_cat[i]
        aps.append(average_precision(sim[i], relevant))
        top = np.argsort(-sim[i], kind="stable")[:p_at]
        precisions.append(float(relevant[top].sum()) / min(p_at, len(top)))
    return CategoryMetrics(float(np.mean(aps)), float(np.mean(precisions)))


def threshold_metrics(sim: np.ndarray, target: np.ndarray, value: float) -> ThresholdMetrics:
    if len(target) == 0:
        return ThresholdMetrics(value, 0.0, 0.0)
    own = sim[np.arange(len(target)), target]
    above = sim >= value
    returned = int(above.sum())
    hits = int((own >= value).sum())
    return ThresholdMetrics(value, hits / len(target), hits / returned if returned else 0.0)


def calibrate_threshold(sim: np.ndarray, target: np.ndarray) -> float:
    """The score threshold that maximises F1 of 'the own photo is returned' over these queries."""
    if len(target) == 0:
        return 1.0
    own = sim[np.arange(len(target)), target]
    candidates = np.unique(np.quantile(own, np.linspace(0.0, 1.0, 101)))
    best, best_f1 = float(candidates[-1]), -1.0
    for t in candidates:
        m = threshold_metrics(sim, target, float(t))
        f1 = 2 * m.precision * m.recall / (m.precision + m.recall) if m.precision + m.recall else 0.0
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def retrieval_metrics(
    sketch_emb: np.ndarray, photo_emb: np.ndarray, data: SketchyDataset, threshold: float | None = None
) -> RetrievalMetrics:
    """acc@K, median rank, mAP@all and P@100 of sketches against the dataset's photos, and the threshold's recall
    and precision (at `threshold`, or at one calibrated on these sketches when it is None)."""
    sim = sketch_emb @ photo_emb.T
    pairs = data.instance_pairs()
    q = np.array([s for s, _ in pairs], dtype=int)
    target = np.array([p for _, p in pairs], dtype=int)
    inst = instance_metrics(sim[q], target) if len(q) else instance_metrics(sim[:0], target)
    cats = sorted({p.category for p in data.photos})
    category = None
    if len(cats) > 1 and data.sketches:  # no sketch, no query to rank: nothing to average
        index = {c: i for i, c in enumerate(cats)}
        qc = np.array([index.get(s.category, -1) for s in data.sketches])
        orphans = int((qc < 0).sum())
        if orphans:
            # kept in mAP@all and P@100 as queries that find nothing (AP 0), as the metric always counted them
            logger.warning(
                "%d sketches belong to categories without photos in %s: they count as AP 0 in mAP@all and P@100",
                orphans,
                data.root,
            )
        gc = np.array([index[p.category] for p in data.photos])
        category = category_metrics(sim, qc, gc)
    value = calibrate_threshold(sim[q], target) if threshold is None else threshold
    return RetrievalMetrics(inst, category, threshold_metrics(sim[q], target, value))
