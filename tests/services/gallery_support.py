"""Helpers shared by the services and worker tests: tiny real models, sample photos, broken files."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image

from encoder.checkpoint import Checkpoint, inference_state, save_checkpoint
from encoder.model import ModelConfig, build_model
from encoder.preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
SKETCHY = DATA / "sketchy100"
SKETCHY_MISSING = f"needs the sketchy100 dataset at {SKETCHY.resolve()} (../shared/data relative to the repo)"
SKETCHSEARCH = Path(sys.executable).parent / "sketchsearch"  # the entry point of the running venv
# low enough that a cheap 1100x1000 PNG is over it, high enough for every sketchy100 photo (256x256)
TINY_MAX_PIXELS = 1_000_000


def build_tiny_model(path: Path, dim: int = 128, image_size: int = 64, seed: int = 0) -> str:
    """A real (untrained) seed-architecture checkpoint that embeds in milliseconds; returns its model id."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="seed", embed_dim=dim, image_size=image_size, channels=1, mid_blocks=(), dropout=0.0
    )
    model = build_model(cfg).eval()
    prep = Preprocessing(image_size=image_size, channels=1, mean=0.0, std=255.0, max_pixels=TINY_MAX_PIXELS)
    ckpt = Checkpoint(name=f"tiny{dim}", config=cfg, preprocessing=prep, state_dict=inference_state(model))
    save_checkpoint(ckpt, path)
    return ckpt.model_id


def copy_photos(dest: Path, categories: Iterable[str], per_category: int) -> list[Path]:
    """Copy the first photos of some sketchy100 categories into dest/<category>/."""
    copied = []
    for category in categories:
        (dest / category).mkdir(parents=True, exist_ok=True)
        for src in sorted((SKETCHY / "photo" / category).glob("*.jpg"))[:per_category]:
            copied.append(Path(shutil.copy2(src, dest / category / src.name)))
    return copied


def write_bad_files(folder: Path, sample_jpeg: Path) -> dict[str, Path]:
    """A corrupt JPEG, a truncated PNG, a text file named .jpg and a photo over TINY_MAX_PIXELS."""
    folder.mkdir(parents=True, exist_ok=True)
    data = sample_jpeg.read_bytes()
    rng = random.Random(0)
    png = io.BytesIO()
    Image.open(sample_jpeg).save(png, "PNG")
    files = {
        "corrupt": folder / "corrupt.jpg",
        "truncated": folder / "truncated.png",
        "text": folder / "notes.jpg",
        "huge": folder / "huge.png",
    }
    files["corrupt"].write_bytes(data[:600] + rng.randbytes(len(data) - 600))  # valid headers, garbage scan
    files["truncated"].write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    files["text"].write_text("this is a shopping list, not a photo\n")
    Image.new("RGB", (1100, 1000), (40, 120, 200)).save(files["huge"])  # 1.1 Mpx: compresses to a few KB
    return files


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    """Poll until predicate() holds; a deadline, not a timing assertion (it only bounds a hung test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(poll)


def cli_env(**settings: str) -> dict[str, str]:
    """The environment for a sketchsearch subprocess: ours without SKETCHSEARCH_*, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKETCHSEARCH_")}
    env.update({f"SKETCHSEARCH_{k.upper()}": v for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [str(SKETCHSEARCH), *args], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO
    )


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
