"""Error types raised by dtprobe.

Every error a user can cause (bad file, bad flag, degenerate input) is a
:class:`DtprobeError`. The CLI prints its message on one line and exits with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(text: str, limit: int = 160) -> str:
    """The first non-blank line of ``text``, cut to ``limit`` characters.

    What a one-line user error quotes of a library's (often multi-line) exception message.

    Parameters
    ----------
    text : str
        A message, e.g. ``str(exc)``.
    limit : int
        Longest result; a longer line ends in ``"..."``.

    Returns
    -------
    str
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class DtprobeError(Exception):
    """Base class for user-facing errors: the message says what is wrong and how to fix it."""


class CheckpointError(DtprobeError):
    """A checkpoint file is missing, unsafe, corrupted or does not fit the model."""


class DatasetError(DtprobeError):
    """A dataset is unknown, missing or malformed."""


class ConfigError(DtprobeError):
    """Inconsistent or missing command-line / API options."""


class MetricInputError(DtprobeError, ValueError):
    """Input to a metric is degenerate (one class, too few samples, NaN/Inf, wrong shape)."""


class RunBusyError(DtprobeError):
    """Another process holds the run's analysis lock (raised with ``--no-wait``)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references code the safe unpickler refuses to run."""


class TrainingDivergedError(DtprobeError):
    """The training loss or its gradient became NaN/Inf or exploded; checkpoints saved so far
    are intact (the message names the epoch, the objective and the last good checkpoint)."""
