"""One rule for containing a failure to the item it happened on.

An analysis is a set of items: checkpoints, downstream datasets, checkpoint x dataset pairs,
metrics, runs of a sweep. A failure on one item must cost that item only, whatever exception
class the library that failed happens to raise (PIL's ``DecompressionBombError`` is not an
``OSError``; a numpy ``LinAlgError`` is not a ``ValueError``). So isolation is never a list of
expected exception types: every site catches ``Exception`` and asks :func:`contain` what to do.

What is *not* the item's failure, and so is raised again:

- ``KeyboardInterrupt`` and ``SystemExit`` (not ``Exception`` subclasses: never caught here):
  the user stops the whole command, keeping completed work.
- an operating-system error about the machine's resources (:data:`ENVIRONMENT_ERRNOS`: disk
  full, quota, read-only file system, too many open files, no memory): every other item would
  meet it too, and the command line prints it on one line (exit 2).

Out of memory (``MemoryError``, ``torch.cuda.OutOfMemoryError``) keeps its own handling: the
extraction first retries with smaller batches
(:func:`dtprobe.features.extract.extract_features`), and one that still reaches an item is
that item's failure with a hint on what to lower (after the CUDA cache is emptied), never
reported as an unexpected error.

Everything else is the item's failure: one line (the message of a
:class:`~dtprobe.errors.DtprobeError`, which already names the file and the fix; otherwise the
exception's class and message, marked *unexpected*), with the full traceback on stderr when
debugging (``--debug`` or ``DTPROBE_DEBUG=1``).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from dataclasses import dataclass

from dtprobe.errors import DtprobeError

__all__ = ["ENVIRONMENT_ERRNOS", "Failure", "contain", "debugging", "is_environment",
           "is_out_of_memory", "set_debug"]

#: ``OSError`` numbers that describe the machine, not the item: raised again, never contained.
ENVIRONMENT_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EMFILE,
                errno.ENFILE, errno.ENOMEM, errno.EPIPE) if e is not None)

#: Prefix of the reason of a failure no check foresaw (see :attr:`Failure.expected`).
UNEXPECTED = "unexpected "

_MAX_DETAIL = 200
_debug = False


def set_debug(on: bool) -> None:
    """Print the traceback of every contained failure (the command line's ``--debug``)."""
    global _debug
    _debug = bool(on)


def debugging() -> bool:
    """Whether contained failures print their traceback (``--debug`` or ``DTPROBE_DEBUG=1``)."""
    return _debug or os.environ.get("DTPROBE_DEBUG", "") not in ("", "0")


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or accelerator memory exhausted (PyTorch's CUDA/MPS messages included)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def is_environment(exc: BaseException) -> bool:
    """Whether ``exc`` is about the machine (see the module docstring), not about one item."""
    return not isinstance(exc, Exception) or (
        isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS)


@dataclass(frozen=True)
class Failure:
    """A contained failure: its one-line ``reason`` and whether a check foresaw it
    (``expected``: a :class:`DtprobeError`). An unexpected failure is never cached as a
    result, so the next analysis tries the item again."""

    reason: str
    expected: bool
    exception: str


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL - 3] + "..."


def contain(exc: BaseException, subject: str, skipped: str = "it is skipped") -> Failure:
    """Classify ``exc``, raised while handling ``subject``: raise it again if it is not the
    item's failure (see the module docstring), else return the :class:`Failure` to record.

    Call it in ``except Exception as exc:``; ``subject`` names the item (a file, a dataset
    spec; empty when the caller's message already names it) and ``skipped`` says what happens
    to it, for the unexpected case.
    """
    if is_environment(exc):
        raise exc
    if debugging():
        traceback.print_exception(exc, file=sys.stderr)
    name = type(exc).__name__
    if isinstance(exc, DtprobeError):
        return Failure(" ".join(str(exc).split()), True, name)
    detail = _one_line(str(exc))
    detail = f" ({detail})" if detail else ""
    subject = f"{subject}: " if subject else ""
    if is_out_of_memory(exc):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Failure(f"{subject}out of memory ({name}{detail}); {skipped} (lower "
                       "--batch-size, --max-samples or --memory-budget)", False, name)
    return Failure(f"{subject}{UNEXPECTED}{name}{detail}; {skipped} (--debug shows the "
                   "traceback)", False, name)
