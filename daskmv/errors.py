"""Exceptions that carry the CLI's exit codes.

Anything wrong with what the user asked for (a bad manifest, an unknown op, a pipeline whose inputs
do not exist, a root that belongs to another run) is a :class:`UsageError` and exits with 2 before any
work starts. A run that started but could not finish raises :class:`RunError` and exits with 1. Row
errors (a corrupt image, say) are neither: they are recorded in the output manifest.
"""

from __future__ import annotations


class DaskmvError(Exception):
    """Base class of the errors daskmv raises on purpose; the message is meant for a person."""

    exit_code = 1


class UsageError(DaskmvError):
    """Bad input or usage: the run does not start. Exit code 2."""

    exit_code = 2


class ManifestError(UsageError):
    """The manifest cannot be used as it is (missing column, duplicate ids, empty, unknown scheme)."""


class PipelineError(UsageError):
    """The pipeline is not valid: unknown op, bad parameter, or an input nothing provides."""


class StoreError(UsageError):
    """The output root cannot be used: locked by another run, or made by a different pipeline."""


class RunError(DaskmvError):
    """The run started but could not complete. Exit code 1; running again resumes."""


class RowError(Exception):
    """A failure that belongs to one row (its message goes into the row's `error` column)."""
