"""One small error hierarchy; the CLI turns each into a one-line message and an exit code."""

from __future__ import annotations


class StylizeError(Exception):
    """Base of every error the user can act on. The message says what to do next."""

    exit_code = 1


class UsageError(StylizeError):
    """Bad options or arguments (exit 2)."""

    exit_code = 2


class InputError(StylizeError):
    """An input file or folder that cannot be read as a video or image sequence."""


class OutputError(StylizeError):
    """An output that cannot be written."""


class ModelError(StylizeError):
    """Missing or incomplete model weights, or a config that does not match them."""
