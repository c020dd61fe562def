"""Evaluation of a model on any Sketchy-layout folder: gallery = all photos, queries = all sketches, cosine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoder.data import SketchyDataset, check_categories, load_dataset
from encoder.embedder import Embedder
from encoder.errors import DatasetError
from encoder.metrics import CategoryMetrics, InstanceMetrics, ThresholdMetrics, retrieval_metrics
from encoder.neighbours import blend_gallery

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalReport:
    model: str
    gallery: int
    queries: int
    instance: InstanceMetrics
    category: CategoryMetrics | None
    threshold: ThresholdMetrics
    embed_seconds: float
    total_seconds: float
    neighbours: int = 0  # gallery vectors blended with this many nearest photos (0: the embeddings); not in JSON

    def to_json(self) -> dict[str, Any]:
        """What `sketchsearch eval --json` writes: model, gallery, queries, instance, category, threshold and
        seconds (embed, total), nothing else."""
        return {
            "model": self.model,
            "gallery": self.gallery,
            "queries": self.queries,
            "instance": self.instance.to_json(),
            "category": self.category.to_json() if self.category else None,
            "threshold": self.threshold.to_json(),
            "seconds": {"embed": self.embed_seconds, "total": self.total_seconds},
        }


def embed_gallery(embedder: Embedder, data: SketchyDataset, batch_size: int = 32) -> np.ndarray:
    """Every photo of `data`, in order; one that cannot be read is an error here, not a skipped row, because the
    metrics index the gallery by position."""
    photos = embedder.embed_photo_files([p.path for p in data.photos], batch_size=batch_size)
    if photos.failures:
        bad = ", ".join(f.reason for f in photos.failures[:3])  # each names its file
        raise DatasetError(f"{len(photos.failures)} photos could not be read: {bad}")
    return photos.vectors


def evaluate_dataset(
    data_dir: Path | str,
    embedder: Embedder,
    categories: set[str] | None = None,
    batch_size: int = 32,
    neighbours: int = 0,
) -> EvalReport:
    """Embed every photo and sketch of the folder and measure retrieval; the model's stored threshold is used
    when it has one, otherwise one is calibrated on this data (and reported as such). neighbours > 0 ranks by
    gallery vectors, each photo blended with its nearest photos as the vector store does
    (encoder/neighbours.py); 0 by the photos' embeddings alone."""
    t0 = time.time()
    data = load_dataset(data_dir)
    if categories:
        check_categories(categories, data.categories, "requested")
        data = data.subset(categories=categories)
    if not data.photos or not data.sketches:
        raise DatasetError(f"{data_dir}: needs both photos and sketches to evaluate")
    t_embed = time.time()
    photos = embed_gallery(embedder, data, batch_size=batch_size)
    sketches = embedder.embed_sketches([s.path for s in data.sketches], batch_size=batch_size)
    embed_seconds = time.time() - t_embed
    gallery = blend_gallery(photos, neighbours)
    result = retrieval_metrics(sketches, gallery, data, threshold=embedder.threshold)
    if embedder.threshold is None:
        logger.info("the model stores no threshold: calibrated one on this data")
    return EvalReport(
        model=embedder.model_id,
        gallery=len(data.photos),
        queries=len(data.sketches),
        instance=result.instance,
        category=result.category,
        threshold=result.threshold,
        embed_seconds=round(embed_seconds, 3),
        total_seconds=round(time.time() - t0, 3),
        neighbours=neighbours,
    )


def format_report(report: EvalReport) -> str:
    """A plain table for the terminal."""
    inst = report.instance
    rows = [
        ("model", report.model),
        ("gallery photos", str(report.gallery)),
        ("sketch queries", str(report.queries)),
        ("instance queries", str(inst.queries)),
        ("gallery neighbours", str(report.neighbours) if report.neighbours else "0 (embeddings alone)"),
    ]
    rows += [(f"acc@{k}", f"{acc:.3f}") for k, acc in inst.acc.items()]
    rows.append(("median rank", f"{inst.median_rank:.1f}" if not np.isnan(inst.median_rank) else "n/a"))
    if report.category:
        rows += [
            ("mAP@all", f"{report.category.map_all:.3f}"),
            ("P@100", f"{report.category.p_at_100:.3f}"),
        ]
    th = report.threshold
    rows += [
        ("threshold", f"{th.value:.3f}"),
        ("  recall", f"{th.recall:.3f}"),
        ("  precision", f"{th.precision:.3f}"),
        ("embed seconds", f"{report.embed_seconds:.1f}"),
        ("total seconds", f"{report.total_seconds:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
