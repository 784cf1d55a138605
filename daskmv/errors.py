"""Exceptions that carry the CLI's exit codes.

Anything wrong with what the user asked for (a bad manifest, an unknown op, a pipeline whose inputs
do not exist, a root that belongs to another run) is a :class:`UsageError` and exits with 2 before any
work starts. A run that started but could not finish raises :class:`RunError` and exits with 1. Row
errors (a corrupt image, say) are neither: they are recorded in the output manifest, and only when more
than ``--max-error-rate`` of the rows failed does the run end with :class:`TooManyRowErrors`, exit 3.
"""

from __future__ import annotations

import errno
from typing import Any


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


class OutputRootError(RunError):
    """Writing into the output root failed (full disk, lost mount, permissions). Exit code 1."""

    @classmethod
    def of(cls, root: str, exc: OSError, what: str = "") -> OutputRootError:
        hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the output root"
        doing = f" ({what})" if what else ""
        return cls(f"cannot write to the output root {root}{doing}: {exc}; {hint} and run the same command "
                   "again to resume (finished partitions are kept)")


class TooManyRowErrors(DaskmvError):
    """The run completed, but more rows failed than ``--max-error-rate`` allows. Exit code 3.

    ``result`` is the :class:`~daskmv.engine.RunResult`: the manifest, with every row's status, is written.
    """

    exit_code = 3

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class SetupFailed(Exception):
    """An op's set-up (model load, device init) failed on one worker; raised by the partition task.

    Not a row error and not the partition's fault: the driver counts these per worker and stops sending
    work to a worker whose set-up keeps failing (see ``SETUP_ATTEMPTS`` in :mod:`daskmv.partition`).
    """

    def __init__(self, worker: str, failures: int, message: str) -> None:
        super().__init__(worker, failures, message)
        self.worker, self.failures, self.message = worker, failures, message

    def __str__(self) -> str:
        return f"op set-up failed on worker {self.worker} ({self.failures}x): {self.message}"


class InputReadError(OSError):
    """Reading a row's file failed for a reason that is not the file's (an I/O error, a timeout):
    the partition fails and is retried instead of recording the row as bad."""


class RowError(Exception):
    """A failure that belongs to one row (its message goes into the row's `error` column)."""
