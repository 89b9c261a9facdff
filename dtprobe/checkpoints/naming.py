"""Checkpoint file names: the naming schemes dtprobe recognises, and which names are a writer's
temporary files (never a checkpoint).

A leaf of :mod:`dtprobe.checkpoints`: no dtprobe imports but the errors.
"""

from __future__ import annotations

import re

import checkpoints_manifest as cm
from dtprobe.errors import ConfigError

#: File-name schemes recognised by :func:`infer_checkpoint_series` (``{epoch}``/``{step}`` are
#: decimal numbers, ``*`` any characters except ``/``).
KNOWN_NAMINGS: tuple[str, ...] = (
    "ckpt_epoch_{epoch}.pth",                  # CTC / CRD / SupCon research code
    "epoch={epoch}-step={step}.ckpt",          # PyTorch Lightning ModelCheckpoint
    "epoch={epoch}-step={step}-v*.ckpt",       # Lightning's de-duplicated names
    "checkpoint_{epoch}.pt",
    "checkpoint-{epoch}.pth.tar",
    "model_{epoch}.pth",
    "epoch_{epoch}.pt",                        # dtprobe's own trainer
    "ckpt_epoch_{epoch}.safetensors",
    "epoch={epoch}-step={step}.safetensors",
    "checkpoint_{epoch}.safetensors",
    "checkpoint-{epoch}.safetensors",
    "model_{epoch}.safetensors",
    "epoch_{epoch}.safetensors",
)
#: File endings of checkpoint-like files (named in the "nothing matched" message).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors", ".pkl", ".pickle")
#: The sub-folder searched besides the run directory itself.
CHECKPOINT_SUBDIR = "checkpoints"
#: File-name endings of partial or temporary files (an interrupted writer's leftovers).
TEMP_SUFFIXES: tuple[str, ...] = (".tmp", ".temp", ".part", ".partial", ".incomplete", ".swp",
                                  "~")


def template_regex(template: str, what: str) -> re.Pattern[str]:
    """Compile a file-name template with ``{epoch}``/``{step}`` and glob wildcards to a regex."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "{":
            end = template.find("}", i)
            name = template[i + 1:end] if end > 0 else ""
            if name not in ("epoch", "step") or name in seen:
                raise ConfigError(f"{what} {template!r}: only one {{epoch}} and at most one "
                                  "{step} placeholder are allowed (write braces nowhere else)")
            seen.add(name)
            out.append(f"(?P<{name}>[0-9]+)")
            i = end + 1
        elif ch == "}":
            raise ConfigError(f"{what} {template!r}: unmatched '}}'")
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[" and (end := template.find("]", i + 2)) > 0:
            body = template[i + 1:end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    if "epoch" not in seen:
        raise ConfigError(f"{what} {template!r} has no {{epoch}} placeholder; e.g. "
                          "--pattern 'weights_{epoch}.pt'")
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ConfigError(f"{what} {template!r}: invalid wildcard ({exc})") from None


#: ``(template, compiled regex)`` of every :data:`KNOWN_NAMINGS` entry, in order.
KNOWN_PATTERNS = [(t, template_regex(t, "naming")) for t in KNOWN_NAMINGS]


def is_temporary_name(name: str) -> bool:
    """Whether a file name is a writer's temporary or partial file, never a checkpoint.

    Hidden names (``.epoch_3.pt.123.tmp``, written before an atomic rename) and names
    ending in one of :data:`TEMP_SUFFIXES` (or holding ``.tmp.``) are what a process killed
    while saving leaves behind; file-name inference skips them even when ``--pattern``
    would match.

    Parameters
    ----------
    name : str
        A file name or a relative path (only the last component is looked at).

    Returns
    -------
    bool
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    lower = base.lower()
    return base.startswith(".") or lower.endswith(TEMP_SUFFIXES) or cm.is_temp_name(lower)
