"""Settings of the platform, read from SKETCHSEARCH_* environment variables through one cached getter."""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.errors import ConfigError

logger = logging.getLogger(__name__)

# scheme://user:password@ -- greedy up to the last @ of the authority, as urllib splits it, so a password
# holding an unescaped @ is masked whole
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#]*)@")
# credentials in the query string: redis-py reads redis://host/0?password=..., and a Qdrant URL may carry
# its API key the same way
_URL_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|api-key)=)[^&#\s]*",
    re.IGNORECASE,
)


def mask_url(text: str) -> str:
    """`text` with the password or key of every URL in it replaced by ***. Broker and Qdrant URLs carry
    credentials, and error messages, job records and `sketchsearch config` are read by people who should not
    see them. It lives here, beside the settings that hold those URLs, because jobs and the vector store both
    print them."""

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        # user:password keeps the user; a lone userinfo (redis://secret@host) may itself be the password
        return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"

    return _URL_SECRET_PARAM.sub(lambda m: f"{m['key']}***", _URL_USERINFO.sub(userinfo, text))


class Settings(BaseSettings):
    """Effective configuration; every field is SKETCHSEARCH_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="SKETCHSEARCH_", extra="ignore")

    home: Path = Field(
        default=Path(".sketchsearch"),
        description="Local state: the embedded vector store, uploads, job records, ONNX model cache.",
    )
    qdrant_url: str | None = Field(
        default=None,
        description="Qdrant server URL; unset: embedded local mode under HOME (one process only).",
    )
    qdrant_api_key: str | None = Field(
        default=None, description="API key for the Qdrant server, if it needs one."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://...); unset: ingestion runs in-process."
    )
    model: str = Field(
        default="default", description="Active model: 'default', a shipped name or a checkpoint path."
    )
    batch_size: int = Field(
        default=64, ge=1, le=4096, description="Photos per embedding batch and per Celery task."
    )
    backend: str | None = Field(
        default=None, description="Inference backend: onnx or torch (default: automatic)."
    )
    threads: int | None = Field(default=None, ge=1, description="Inference threads (default: all cores).")
    queue: str = Field(default="sketchsearch", description="Celery queue the ingestion batches go to.")
    visibility_timeout: int = Field(
        default=600,
        ge=1,
        description="Seconds before an unacknowledged batch (its worker died) is delivered again; "
        "must exceed the longest batch.",
    )
    search_limit: int = Field(
        default=1000, ge=1, description="Most hits a threshold search returns (it has no top-k)."
    )
    gallery_neighbours: int = Field(
        default=5,
        ge=0,
        le=64,
        description="Searches rank each photo by its embedding blended with its K nearest gallery photos' "
        "(0: the embedding alone). Part of the collection's name: a new K builds a new collection.",
    )

    @field_validator("qdrant_url", "broker_url", "qdrant_api_key", "backend", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `export SKETCHSEARCH_BROKER_URL=` is the usual way to switch a setting off in a shell
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def store_path(self) -> Path:
        """Folder of the embedded (local mode) Qdrant store."""
        return self.home / "qdrant"

    @property
    def jobs_path(self) -> Path:
        """Folder of the job records kept when no broker is configured."""
        return self.home / "jobs"

    @property
    def uploads_path(self) -> Path:
        """Folder for photos and sketches uploaded through a UI (paths of stored photos point here)."""
        return self.home / "uploads"

    @property
    def model_cache_path(self) -> Path:
        """Folder of the ONNX graphs exported from checkpoints."""
        return self.home / "models"

    @property
    def embedded(self) -> bool:
        return self.qdrant_url is None

    def describe(self) -> dict[str, str]:
        """The effective settings as text, with what an unset value means; the API key is never shown."""
        return {
            "home": str(self.home.resolve()),
            "qdrant_url": self.qdrant_url or f"(unset: embedded store at {self.store_path.resolve()})",
            "qdrant_api_key": "(set)" if self.qdrant_api_key else "(unset)",
            "broker_url": self.broker_url or "(unset: jobs run in-process)",
            "model": self.model,
            "batch_size": str(self.batch_size),
            "backend": self.backend or "(automatic: torch on CUDA, else onnx)",
            "threads": str(self.threads) if self.threads else "(all cores)",
            "queue": self.queue,
            "visibility_timeout": str(self.visibility_timeout),
            "search_limit": str(self.search_limit),
            "gallery_neighbours": str(self.gallery_neighbours),
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; call get_settings.cache_clear() after changing the environment.
    ConfigError, naming each bad variable, when one cannot be read."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SKETCHSEARCH_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
