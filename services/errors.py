"""Errors of the platform layer: each one says what went wrong and what to do about it."""

from __future__ import annotations

from encoder.errors import SketchSearchError


class ConfigError(SketchSearchError):
    """A setting that cannot work (for example a broker scheme without job records)."""


class StoreUnavailableError(SketchSearchError):
    """The vector store cannot be reached or answered with an error."""


class StoreLockedError(StoreUnavailableError):
    """The embedded store is already open in another process (qdrant local mode allows one)."""


class CollectionExistsError(SketchSearchError):
    """A collection (or alias) created while another process created the same one: the losing side of a race
    that ensure_collection resolves by using the winner's."""


class DimensionMismatchError(SketchSearchError):
    """A collection whose vectors do not have the model's dimension; it is never written into."""


class GalleryNotFoundError(SketchSearchError):
    """No collection exists yet for the active model."""


class PhotoNotFoundError(SketchSearchError):
    """A photo id (or file) that is not in the gallery."""


class BrokerUnavailableError(SketchSearchError):
    """The Celery broker (Redis) cannot be reached."""


class JobStoreError(SketchSearchError):
    """Redis answered a job-record command with an error that waiting will not fix (WRONGTYPE, NOPERM, OOM,
    READONLY, a wrong password): unlike BrokerUnavailableError, retrying the same command is pointless."""


class JobNotFoundError(SketchSearchError):
    """A job id without a record."""


class JobRecordError(SketchSearchError):
    """A job that stopped without its record saying so (the record could not be written)."""


class InvalidQueryError(SketchSearchError, ValueError):
    """Search limits that cannot work (top-k below 1, a threshold outside [-1, 1], both at once); a
    ValueError too, as it was before it had a type of its own."""
