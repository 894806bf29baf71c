"""User-facing errors.

Anything the user can fix (a bad recipe key, a missing file, a batch size that does not divide)
raises :class:`TurnctlError`. The CLI prints it as one line and exits with status 2; other
exceptions are bugs and print a short line too, with the traceback behind ``TURNCTL_DEBUG=1``.
"""

from __future__ import annotations


class TurnctlError(Exception):
    """An error with a one-line, actionable message for the user."""

    exit_code = 2
    label = "error: "  # how the CLI prefixes the message


class RecipeError(TurnctlError):
    """The recipe (file, ``--set`` override or derived setting) is invalid."""


class DataError(TurnctlError):
    """Input data (raw dataset, shards, label files, caches) is missing or malformed."""


class DistributedError(TurnctlError):
    """Ranks disagree or a gather lost / duplicated samples."""
