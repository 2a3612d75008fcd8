"""Exceptions raised by pydgemma. Every failure of the native core carries its one-line message."""

from __future__ import annotations


class PydgemmaError(Exception):
    """Base class of every pydgemma error. ``status`` is the core's status name, e.g. ``DG_ERR_FORMAT``."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class NativeLibraryError(PydgemmaError):
    """The native core (libdgemma) could not be found or loaded."""


class ModelError(PydgemmaError):
    """A model file could not be opened, is not a valid DiffusionGemma GGUF, or cannot run here."""
