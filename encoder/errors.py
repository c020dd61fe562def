"""The error hierarchy shared by every layer: one base, specific subclasses."""

from __future__ import annotations


class SketchSearchError(Exception):
    """Base of every error sketchsearch raises on purpose."""


class InvalidImageError(SketchSearchError):
    """A file or byte string that is not a usable image (corrupt, truncated, too large, not an image)."""


class EmptySketchError(SketchSearchError):
    """A sketch with no ink on it."""


class ModelLoadError(SketchSearchError):
    """A model reference that does not resolve to a readable checkpoint."""


class DatasetError(SketchSearchError):
    """A data folder that does not follow the Sketchy layout."""
