"""The `sketchsearch` command line: each command maps onto one module."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from encoder.errors import SketchSearchError
from services.errors import InvalidQueryError

if TYPE_CHECKING:
    from encoder.checkpoint import Checkpoint
    from services.config import Settings
    from services.gallery import Gallery
    from services.ingest import IngestSummary
    from services.jobs import Job, JobStore, LocalJobRunner
    from services.vector_store import SearchHit, VectorStore

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Draw a sketch, find the photo.")
logger = logging.getLogger(__name__)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# the ranking a stored threshold is calibrated for (train, whiten, join-pooled); eval and search rank the same way
CalibrationNeighbours = Annotated[
    int | None,
    typer.Option(
        "--gallery-neighbours",
        min=0,
        max=64,
        help="Calibrate the threshold on photos blended with their K nearest photos, as search and eval rank "
        "(default: SKETCHSEARCH_GALLERY_NEIGHBOURS, 5); 0: on the photo embeddings alone.",
    ),
]


@app.command("train")
def train_command(
    data_dirs: Annotated[list[Path], typer.Argument(help="Sketchy-layout folder(s), or a folder holding several.")],
    model: Annotated[str, typer.Option(help="seed, lite0, lite1 or lite2.")] = "lite1",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training pairs.")] = 8,
    out: Annotated[
        Path, typer.Option(help="Output folder (gets model.pt), or a checkpoint file name ending in .pt.")
    ] = Path("runs"),
    holdout: Annotated[str, typer.Option(help="Comma-separated categories kept out for validation.")] = "",
    val: Annotated[list[Path] | None, typer.Option(help="Extra Sketchy-layout folder(s) to validate on.")] = None,
    pseudo: Annotated[
        list[Path] | None, typer.Option(help="Folder(s) of HED pseudo-sketches: <dir>/<category>/<stem>.png.")
    ] = None,
    embed_dim: Annotated[int, typer.Option(help="Embedding dimension.")] = 512,
    # min: encoder.train.MIN_BATCH, restated so that a usage error needs no torch import (a test keeps them equal)
    batch_size: Annotated[int, typer.Option(min=4, help="Sketch/photo pairs per step (at least 4).")] = 48,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    name: Annotated[str, typer.Option(help="Model name (the id adds a weight hash).")] = "",
    pseudo_per_epoch: Annotated[int, typer.Option(help="Pseudo-sketch pairs mixed into each epoch.")] = 1000,
    threshold: Annotated[
        float | None, typer.Option(help="Score threshold to store (default: calibrated on the first validation set).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Keep frozen-trunk features here and reuse them in later runs.")
    ] = None,
    half: Annotated[bool, typer.Option(help="Store the weights as fp16 (half the size).")] = False,
    nce_weight: Annotated[
        float, typer.Option(help="Weight of a symmetric InfoNCE term beside the triplet loss (0: off).")
    ] = 1.0,
    separate_heads: Annotated[
        bool, typer.Option(help="A sketch head and a photo head instead of one shared head.")
    ] = False,
    last_epoch: Annotated[
        bool, typer.Option(help="Keep the last epoch rather than the one with the best validation score.")
    ] = False,
    image_size: Annotated[
        int, typer.Option(help="Input side in pixels (0: the model's default).")
    ] = 0,
    train_from_block: Annotated[
        int | None,
        typer.Option(
            help="Trunk blocks before this one stay frozen (and cached); default: the start of stage 3 "
            "(Lite0) or stage 4 (Lite1/2)."
        ),
    ] = None,
    sketch_norm: Annotated[
        bool, typer.Option(help="Separate BatchNorm statistics for sketches (AdaBN), estimated on training sketches.")
    ] = False,
    ce_weight: Annotated[
        float, typer.Option(help="Weight of the category cross-entropy term (0: off).")
    ] = 1.0,
    sketch_norm_front: Annotated[
        bool, typer.Option(help="With --sketch-norm: sketch statistics in the frozen blocks only.")
    ] = False,
    kd_weight: Annotated[
        float, typer.Option(help="Weight of distilling the ImageNet classifier's view of each photo (0: off).")
    ] = 0.0,
    rkd_weight: Annotated[
        float,
        typer.Option(help="Weight of keeping photo-to-photo similarities close to the ImageNet trunk's (0: off)."),
    ] = 0.0,
    cache_views: Annotated[
        int, typer.Option(help="Augmented views of each image cached for training (the first is unaugmented).")
    ] = 2,
    mirror_pairs: Annotated[
        bool,
        typer.Option(help="Mirror a sketch and its photo together in training (--no-mirror-pairs: a coin flip each)."),
    ] = True,
    pooled_weight: Annotated[
        float,
        typer.Option(help="Weight of the trunk's centred pooled vector, joined to the embedding after training."),
    ] = 0.5,
    pooled_dims: Annotated[
        int, typer.Option(help="With --pooled-weight: project that vector onto its top principal directions (0: all).")
    ] = 256,
    pooled_ce_weight: Annotated[
        float,
        typer.Option(help="Weight of a category cross-entropy term on the trunk's pooled vector (0: off)."),
    ] = 0.0,
    joined_loss: Annotated[
        bool | None,
        typer.Option(
            "--joined-loss/--no-joined-loss",
            help="Train the triplet and InfoNCE terms on the embedding joined to the pooled vector "
            "(default: on wherever --pooled-weight joins it).",
        ),
    ] = None,
    frozen_photo_trunk: Annotated[
        bool,
        typer.Option(help="Photos keep the ImageNet trunk (a frozen second copy); only the sketches' is fine-tuned."),
    ] = False,
    whiten_power: Annotated[
        float, typer.Option(help="Whitening fitted on the training embeddings after training (0: off, 0.5: full).")
    ] = 0.25,
    whiten_shrink: Annotated[
        float, typer.Option(help="Share of the mean eigenvalue added to each before whitening.")
    ] = 0.1,
    gallery_neighbours: CalibrationNeighbours = None,
) -> None:
    """Train a model; the checkpoint holds weights, config, preprocessing and validation metrics."""
    from encoder.train import TrainConfig, train

    logging.getLogger("encoder").setLevel(logging.INFO)
    if joined_loss and pooled_weight <= 0:
        _fail(SketchSearchError("--joined-loss trains on the join: it needs --pooled-weight above 0"))
    cfg = TrainConfig(
        model=model, epochs=epochs, embed_dim=embed_dim, batch_size=batch_size, seed=seed, device=device,
        holdout=[c for c in holdout.split(",") if c], val_dirs=[str(v) for v in val or []],
        pseudo_dirs=[str(p) for p in pseudo or []], name=name, pseudo_per_epoch=pseudo_per_epoch,
        threshold=threshold, cache_dir=str(cache_dir) if cache_dir else "", select_best=not last_epoch,
        shared_head=not separate_heads,
        nce_weight=nce_weight, image_size=image_size, train_from_block=train_from_block,
        sketch_norm=sketch_norm, sketch_norm_front=sketch_norm_front, ce_weight=ce_weight,
        kd_weight=kd_weight, rkd_weight=rkd_weight, cache_views=cache_views, mirror_pairs=mirror_pairs,
        frozen_photo_trunk=frozen_photo_trunk, pooled_weight=pooled_weight, pooled_dims=pooled_dims,
        pooled_ce_weight=pooled_ce_weight, joined_loss=joined_loss is not False,
        whiten_power=whiten_power, whiten_shrink=whiten_shrink,
        gallery_neighbours=_gallery_neighbours(gallery_neighbours),
    )
    if out.suffix != ".pt":
        out = out / "model.pt"
    try:
        ckpt = train(list(data_dirs), cfg, out)
        if half:
            from encoder.checkpoint import save_checkpoint

            save_checkpoint(ckpt, out, half=True)
    except SketchSearchError as exc:
        _fail(exc)
        return
    typer.echo(f"saved {out} ({ckpt.model_id}), threshold {ckpt.threshold}")
    _echo_validation(ckpt)


# the options of the commands that refit a trained model on its training data (whiten, join-pooled)
RefitData = Annotated[list[Path], typer.Argument(help="The model's training data: Sketchy-layout folder(s).")]
RefitModel = Annotated[str, typer.Option(help="default, a shipped name, or a checkpoint path.")]
RefitHoldout = Annotated[str, typer.Option(help="Comma-separated categories the model was not trained on.")]
RefitVal = Annotated[list[Path] | None, typer.Option(help="Sketchy-layout folder(s) to validate on.")]
RefitThreshold = Annotated[
    float | None, typer.Option(help="Score threshold to store (default: calibrated on the first --val set).")
]
RefitHalf = Annotated[bool, typer.Option(help="Store the weights as fp16 (half the size).")]
RefitAgain = Annotated[
    bool,
    typer.Option(
        "--refit", help="Start from the model's trained weights without what it fitted before (e.g. on other data)."
    ),
]


@app.command("whiten")
def whiten_command(
    data_dirs: RefitData,
    model: RefitModel = "default",
    out: Annotated[Path, typer.Option(help="Where to write the whitened checkpoint (.pt).")] = Path("whitened.pt"),
    power: Annotated[float, typer.Option(help="0.5: full whitening; smaller values whiten less.")] = 0.25,
    shrink: Annotated[float, typer.Option(help="Share of the mean eigenvalue added to each.")] = 0.1,
    holdout: RefitHoldout = "",
    val: RefitVal = None,
    threshold: RefitThreshold = None,
    half: RefitHalf = False,
    refit: RefitAgain = False,
    gallery_neighbours: CalibrationNeighbours = None,
) -> None:
    """Fit whitening for a trained model on its training data and write it as a new model (a new id).

    With --refit, a model that is already whitened (and joined) is whitened again from its trained weights: both
    fits are dropped, so follow with `join-pooled` to join it again."""
    from encoder.train import whiten_checkpoint

    def start(ckpt: Checkpoint) -> Checkpoint:
        return ckpt.without_pooled_join().without_whitening() if refit else ckpt

    _save_refit(
        whiten_checkpoint, (power, shrink), model, data_dirs, holdout, val, threshold, gallery_neighbours, out, half,
        start,
    )


def _save_refit(
    fit: Callable[..., Checkpoint],
    settings: tuple[float, ...],
    model: str,
    data_dirs: list[Path],
    holdout: str,
    val: list[Path] | None,
    threshold: float | None,
    neighbours: int | None,
    out: Path,
    half: bool,
    start: Callable[[Checkpoint], Checkpoint],
) -> None:
    """Refit the model on its training data (`fit(start(model), data_dirs, *settings, ...)`), write it and print
    its id, width, threshold and validation, or fail clearly."""
    from encoder.checkpoint import load_checkpoint, save_checkpoint
    from encoder.train import check_checkpoint_output

    try:
        check_checkpoint_output(out)  # before the fit, which embeds the whole training data
        ckpt = fit(
            start(load_checkpoint(model)), list(data_dirs), *settings,
            holdout=[c for c in holdout.split(",") if c], val_dirs=list(val or []), threshold=threshold,
            neighbours=_gallery_neighbours(neighbours),
        )
        save_checkpoint(ckpt, out, half=half)
    except SketchSearchError as exc:
        _fail(exc)
        return
    typer.echo(f"saved {out} ({ckpt.model_id}, {ckpt.dim} dimensions), threshold {ckpt.threshold}")
    _echo_validation(ckpt)


def _echo_validation(ckpt: Checkpoint) -> None:
    """A line per validation set: by the embeddings, then by gallery vectors where the checkpoint has them."""
    from encoder.metrics import RetrievalMetrics

    k = ckpt.metrics.get("threshold_neighbours", 0)
    for key, label in (("validation", ""), ("validation_gallery", f" (gallery neighbours {k})")):
        for set_name, stored in (ckpt.metrics.get(key) or {}).items():
            res = RetrievalMetrics.from_json(stored)
            typer.echo(
                f"validation {set_name}{label}: acc@1 {res.instance.acc[1]:.3f} acc@10 {res.instance.acc[10]:.3f}"
                + (f" mAP@all {res.category.map_all:.3f}" if res.category else "")
                + (f" threshold recall {res.threshold.recall:.3f}" if key == "validation_gallery" else "")
            )


@app.command("join-pooled")
def join_pooled_command(
    data_dirs: RefitData,
    model: RefitModel = "default",
    out: Annotated[Path, typer.Option(help="Where to write the new checkpoint (.pt).")] = Path("joined.pt"),
    weight: Annotated[float, typer.Option(help="Weight of the pooled vector against the embedding's 1.")] = 0.5,
    dims: Annotated[
        int, typer.Option(help="Project the pooled vector onto its top principal directions (0: all).")
    ] = 256,
    holdout: RefitHoldout = "",
    val: RefitVal = None,
    threshold: RefitThreshold = None,
    half: RefitHalf = False,
    refit: RefitAgain = False,
    gallery_neighbours: CalibrationNeighbours = None,
) -> None:
    """Join the trunk's centred pooled vector to a trained model's embedding and write it as a new model.

    With --refit, a model that already joins it is joined again (its whitening is kept)."""
    from encoder.train import join_pooled_checkpoint

    def start(ckpt: Checkpoint) -> Checkpoint:
        return ckpt.without_pooled_join() if refit else ckpt

    _save_refit(
        join_pooled_checkpoint, (weight, dims), model, data_dirs, holdout, val, threshold, gallery_neighbours, out,
        half, start,
    )


@app.command("eval")
def eval_command(
    data_dir: Annotated[Path, typer.Argument(help="A folder in the Sketchy layout.")],
    model: Annotated[
        str, typer.Option(help="default, a shipped name, imagenet-lite0, or a checkpoint path.")
    ] = "default",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    categories: Annotated[str, typer.Option(help="Comma-separated categories to restrict to.")] = "",
    backend: Annotated[str | None, typer.Option(help="onnx (CPU) or torch; default: torch on CUDA, else onnx.")] = None,
    gallery_neighbours: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=64,
            help="Rank by photos blended with their K nearest photos, as search does (default: "
            "SKETCHSEARCH_GALLERY_NEIGHBOURS, 5); 0 ranks by the photo embeddings alone.",
        ),
    ] = None,
) -> None:
    """Retrieve every sketch's photo among all photos of DATA_DIR and report acc@K, mAP and threshold metrics."""
    from encoder.embedder import load_embedder
    from encoder.evaluate import evaluate_dataset, format_report

    neighbours = _gallery_neighbours(gallery_neighbours)
    try:
        if json_path:
            from encoder.checkpoint import check_writable

            check_writable(json_path, "the JSON report")  # before the evaluation, not after it
        # the ONNX exports go where the platform keeps them (HOME/models), shared with search and ingest
        embedder = load_embedder(
            None if model == "default" else model, backend=backend, cache_dir=_settings().model_cache_path
        )
        report = evaluate_dataset(
            data_dir, embedder, categories={c for c in categories.split(",") if c} or None, neighbours=neighbours
        )
    except SketchSearchError as exc:
        _fail(exc)
        return
    typer.echo(format_report(report))
    if json_path:
        # through a file of its own in the same folder, as checkpoints are: what check_writable checked (the
        # folder) is what the write needs, and a reader never sees half a report
        tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(report.to_json(), indent=2))
            tmp.replace(json_path)
        except OSError as exc:  # checked above, but the disk can fill or the folder go in the meantime
            tmp.unlink(missing_ok=True)
            _fail(SketchSearchError(f"cannot write the JSON report to {json_path}: {exc.strerror or exc}"))


# --- the gallery platform: config, ingest, worker, jobs, search, similar, stats ---------------------------

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
HitsJsonFlag = Annotated[
    bool, typer.Option("--json", help="Print a JSON list of {id, path, score, category}, best first.")
]
TopK = Annotated[int | None, typer.Option("--top-k", "-k", help="Return the K best photos (default 10).")]
Threshold = Annotated[
    float | None, typer.Option(help="Return every photo with cosine similarity >= S instead of the top K.")
]
CategoryFilter = Annotated[str | None, typer.Option(help="Only photos of this category.")]


def _settings() -> Settings:
    from services.config import get_settings

    try:
        return get_settings()
    except SketchSearchError as exc:  # a bad SKETCHSEARCH_* variable: say which, not a traceback
        _fail(exc)
        raise


def _gallery_neighbours(option: int | None) -> int:
    """--gallery-neighbours, or the setting that search ranks with when it is not given."""
    return _settings().gallery_neighbours if option is None else option


def _print_summary(summary: IngestSummary, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return
    typer.echo(
        f"added {summary.added}, already present {summary.already_present}, failed {summary.failed}"
        f" ({summary.seconds:.1f} s of batch work)"
    )
    for failure in summary.failures:
        typer.echo(f"  failed: {failure.path}: {failure.reason}")


def _follow(jobs: JobStore, job_id: str, queue_hint: str | None, runner: LocalJobRunner | None = None) -> Job:
    """Show a job's progress until it finishes; the record is the only source, so this works for in-process
    jobs and for Celery jobs alike. With the in-process runner, also until its thread ends: a thread that could
    not write the record (a full disk) never finishes it, and its error is raised instead."""
    from tqdm import tqdm

    from services.jobs import JobState, follow_job

    started = time.monotonic()
    hinted = False
    total = jobs.get_job(job_id).photos
    with tqdm(total=total, unit="photo", file=sys.stderr, mininterval=0.5, dynamic_ncols=True) as bar:

        def update(job: Job) -> None:
            nonlocal hinted
            bar.update(job.done_photos - bar.n)
            if queue_hint and not hinted and job.state == JobState.QUEUED and time.monotonic() - started > 15:
                hinted = True
                tqdm.write(f"waiting for a worker on queue {queue_hint}: is `sketchsearch worker` running?",
                           file=sys.stderr)

        if runner is not None:
            return runner.follow(job_id, on_update=update)
        return follow_job(jobs, job_id, on_update=update)


@app.command("config")
def config_command(as_json: JsonFlag = False) -> None:
    """Print the effective settings (SKETCHSEARCH_* environment variables and their defaults)."""
    from services.jobs import mask_url

    # URLs may carry a password (redis://:secret@host): what is printed is often pasted into issues
    described = {key: mask_url(value) for key, value in _settings().describe().items()}
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    width = max(len(k) for k in described)
    for key, value in described.items():
        typer.echo(f"SKETCHSEARCH_{key.upper():<{width}} = {value}")


@app.command("ingest")
def ingest_command(
    paths: Annotated[list[Path], typer.Argument(help="Photo files and folders (walked recursively).")],
    label: Annotated[str | None, typer.Option(help="Category of every photo (default: its folder).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="With a broker: follow the job to its end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Add photos to the gallery of the active model; photos already stored are skipped.

    Without SKETCHSEARCH_BROKER_URL this process owns the store and runs the job itself (always waits).
    With it, the batches go to `sketchsearch worker` and this process never opens the store."""
    from services.ingest import IngestSummary, collect_photos
    from services.jobs import FileJobStore, LocalJobRunner, RedisJobStore, submit_celery_ingest

    # a path that is not there is a mistake in the command, not a photo that failed: say so before loading
    # the model, creating the collection or recording a job
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        _fail(SketchSearchError(f"no such file or folder: {', '.join(missing)}"))
    settings = _settings()
    files, rejected = collect_photos(paths, label)
    if not files and rejected:  # only files that are not photos: nothing to run a job for
        _print_summary(IngestSummary(failures=list(rejected)), as_json)
        typer.echo("error: nothing to ingest: none of the files given is a photo", err=True)
        raise typer.Exit(code=1)
    try:
        if settings.broker_url:
            job = submit_celery_ingest(settings, files, label, rejected)
            queued = f"{job.photos} photos in {job.batches} batches queued on {settings.queue}"
            typer.echo(f"job {job.id}: {queued}", err=True)
            if not wait:
                typer.echo(f"follow it with `sketchsearch jobs {job.id}`", err=True)
                return
            jobs = RedisJobStore(settings.broker_url)
            try:
                job = _follow(jobs, job.id, settings.queue)
            except KeyboardInterrupt:
                typer.echo(f"stopped following; the job goes on: `sketchsearch jobs {job.id}`", err=True)
                raise typer.Exit(code=130) from None
            finally:
                jobs.close()
        else:
            from services.gallery import load_active_model, open_gallery
            from services.vector_store import open_store

            store = open_store(settings)  # first: a locked store fails before seconds of model loading
            try:
                gallery = open_gallery(store, load_active_model(settings), create=True)
                runner = LocalJobRunner(gallery, FileJobStore(settings.jobs_path), settings.batch_size)
                job = runner.submit(files, label, rejected)
                try:
                    job = _follow(runner.jobs, job.id, None, runner)
                except KeyboardInterrupt:
                    runner.cancel(job.id)
                    # a thread that died without its record raises here as a SketchSearchError (handled
                    # below, with its fix), not as the thread's raw OSError and a traceback
                    runner.wait(job.id)
                    typer.echo("interrupted: run the same command again to add what is missing", err=True)
                    raise typer.Exit(code=130) from None
                finally:
                    runner.shutdown()
            finally:
                store.close()
    except SketchSearchError as exc:
        _fail(exc)
        return
    summary = job.summary()
    _print_summary(summary, as_json)
    for error in job.errors():
        typer.echo(f"error: {error}", err=True)
    if job.errors():
        raise typer.Exit(code=1)
    if summary.failed and not (summary.added or summary.already_present):
        # some failures beside stored photos are a normal run (listed above); failures alone are not
        typer.echo(f"error: nothing could be ingested: all {summary.failed} files failed", err=True)
        raise typer.Exit(code=1)


@app.command("worker", context_settings={"allow_extra_args": False})
def worker_command(
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Default: sketchsearch-<pid>@<host>.")] = None,
) -> None:
    """Run a Celery worker: one batch at a time, acknowledged when done, the model loaded once.

    In embedded mode the worker owns the store for its whole life: stop it before `search`/`stats`, or use
    a Qdrant server (SKETCHSEARCH_QDRANT_URL) to share the gallery between processes."""
    settings = _settings()
    if not settings.broker_url:
        _fail(SketchSearchError("SKETCHSEARCH_BROKER_URL is not set: a worker needs a broker "
                                "(without one, `sketchsearch ingest` runs jobs in-process)"))
    argv = [sys.executable, "-m", "worker", f"--loglevel={loglevel}"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    sys.stdout.flush()
    sys.stderr.flush()
    # the worker layer sits above services (import contract), so the CLI hands the process over to it; the
    # pid stays the same, so signals sent to `sketchsearch worker` reach the worker itself
    os.execv(sys.executable, argv)


@app.command("jobs")
def jobs_command(
    job_id: Annotated[str | None, typer.Argument(help="Show one job in detail.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent jobs to list.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """List recent ingestion jobs with their progress (from Redis with a broker, else from HOME/jobs)."""
    from services.jobs import open_job_store

    try:
        store = open_job_store(_settings())
        try:
            jobs = [store.get_job(job_id)] if job_id else store.list_jobs(limit)
        finally:
            store.close()
    except SketchSearchError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps([j.to_json() for j in jobs], indent=2))
        return
    if not jobs:
        typer.echo("no jobs")
        return
    header = f"{'JOB':<12}  {'STATE':<11}  {'PROGRESS':>17}  {'ADDED':>6}  {'PRESENT':>7}  {'FAILED':>6}"
    typer.echo(f"{header}  CREATED")
    for job in jobs:
        s = job.summary()
        pct = 100.0 * job.done_photos / job.photos if job.photos else 100.0
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        progress = f"{job.done_photos}/{job.photos} ({pct:.0f}%)"
        counts = f"{s.added:>6}  {s.already_present:>7}  {s.failed:>6}"
        typer.echo(f"{job.id:<12}  {job.state.value:<11}  {progress:>17}  {counts}  {created}")
    if job_id:
        for failure in jobs[0].summary().failures:
            typer.echo(f"  failed: {failure.path}: {failure.reason}")
        for error in jobs[0].errors():
            typer.echo(f"  error: {error}")


def _print_hits(hits: list[SearchHit], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([h.to_json() for h in hits], indent=2))
        return
    if not hits:
        typer.echo("no hits")
    for rank, hit in enumerate(hits, 1):
        typer.echo(f"{rank:>3}  {hit.score:.4f}  {hit.category:<20}  {hit.path}  {hit.id}")


def _open_reader(settings: Settings) -> tuple[VectorStore, Gallery]:
    from services.gallery import load_active_model, open_gallery
    from services.vector_store import open_store

    store = open_store(settings)  # first: a locked store fails before seconds of model loading
    try:
        return store, open_gallery(store, load_active_model(settings), create=False)
    except BaseException:
        store.close()
        raise


@app.command("search")
def search_command(
    sketch: Annotated[Path, typer.Argument(help="The sketch image (black strokes on white, any format).")],
    top_k: TopK = None,
    threshold: Threshold = None,
    category: CategoryFilter = None,
    as_json: HitsJsonFlag = False,
) -> None:
    """Find the photos that match a sketch, best first."""
    from services.search import search_sketch

    if top_k is not None and threshold is not None:
        raise typer.BadParameter("give --top-k or --threshold, not both")
    settings = _settings()
    try:
        store, gallery = _open_reader(settings)
        try:
            hits = search_sketch(gallery, sketch, top_k=top_k, threshold=threshold, category=category,
                                 max_hits=settings.search_limit)
        finally:
            store.close()
    except InvalidQueryError as exc:  # the limits given; anything else is not a usage error
        raise typer.BadParameter(str(exc)) from exc
    except SketchSearchError as exc:
        _fail(exc)
        return
    _print_hits(hits, as_json)


@app.command("similar")
def similar_command(
    photo_id: Annotated[str, typer.Argument(help="A stored photo's id, or a photo file.")],
    top_k: TopK = None,
    threshold: Threshold = None,
    category: CategoryFilter = None,
    as_json: HitsJsonFlag = False,
) -> None:
    """Find stored photos like a stored photo."""
    from services.search import find_similar

    if top_k is not None and threshold is not None:
        raise typer.BadParameter("give --top-k or --threshold, not both")
    settings = _settings()
    try:
        store, gallery = _open_reader(settings)
        try:
            hits = find_similar(gallery, photo_id, top_k=top_k, threshold=threshold, category=category,
                                max_hits=settings.search_limit)
        finally:
            store.close()
    except InvalidQueryError as exc:  # the limits given; anything else is not a usage error
        raise typer.BadParameter(str(exc)) from exc
    except SketchSearchError as exc:
        _fail(exc)
        return
    _print_hits(hits, as_json)


@app.command("reblend")
def reblend_command() -> None:
    """Blend the active model's gallery vectors again from the stored embeddings, exactly (an admin step after
    bulk ingestion into a server, whose photo-by-photo blending is approximate; it reads the whole gallery)."""
    from services.gallery import read_model_identity
    from services.vector_store import open_store

    settings = _settings()
    try:
        with open_store(settings) as store:
            identity = read_model_identity(settings)
            collection = store.find_collection(identity.model_id, identity.dim)
            changed, photos = store.reblend(collection)
    except SketchSearchError as exc:
        _fail(exc)
        return
    if settings.gallery_neighbours <= 0:
        typer.echo(f"{collection}: gallery neighbours are off (SKETCHSEARCH_GALLERY_NEIGHBOURS=0), nothing to blend")
        return
    typer.echo(f"{collection}: {changed} of {photos} gallery vectors blended again")


@app.command("stats")
def stats_command(as_json: JsonFlag = False) -> None:
    """How many photos the active model's collection holds, per category."""
    from services.gallery import read_model_identity
    from services.search import read_stats
    from services.vector_store import open_store

    settings = _settings()
    try:
        with open_store(settings) as store:
            stats = read_stats(store, read_model_identity(settings))
    except SketchSearchError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(stats.to_json(), indent=2))
        return
    typer.echo(f"model       {stats.model}\ncollection  {stats.collection}\nphotos      {stats.photos}")
    for name, count in stats.categories.items():
        typer.echo(f"  {name:<24} {count}")
