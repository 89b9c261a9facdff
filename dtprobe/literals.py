"""The value rule of every ``KEY=VALUE`` option (a leaf module: no torch, no dtprobe imports)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["json_value"]


def json_value(raw: str) -> Any:
    """``raw`` as a JSON literal where it is one (``500``, ``true``, ``[1, 2]``), else the text
    itself: the rule of ``--dataset-param``, ``--arch-param``, ``--objective-param``, ``--param``
    and downstream specs. Any failure to parse (also a nesting ``RecursionError`` or an integer
    beyond Python's digit limit) keeps the text, which the parameter's own check then refuses on
    one line if it must be a number."""
    try:
        return json.loads(raw)
    except Exception:  # any class: not a JSON literal
        return raw
