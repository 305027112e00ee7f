"""The one error model preparation raises: the CLI prints its message as a single line."""

from __future__ import annotations


class ModelPreparationError(RuntimeError):
    """A model could not be built (missing package, corrupt download, bad output folder)."""
