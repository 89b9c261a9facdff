"""Loading weights into a model: the reading that fits it (:mod:`~dtprobe.checkpoints.state_dict`),
checked (:mod:`~dtprobe.checkpoints.reader`), then loaded strictly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from dtprobe.checkpoints.reader import LoadedCheckpoint, check_finite, check_tensors
from dtprobe.checkpoints.state_dict import mismatch_message, resolve
from dtprobe.errors import CheckpointError, first_line

__all__ = ["load_into_model", "load_weights"]


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    if not missing or not unexpected:
        return ""
    heads = {key.split(".", 1)[0] for key in unexpected if "." in key}
    if len(heads) == 1:
        prefix = heads.pop() + "."
        if {key[len(prefix):] for key in unexpected} >= set(missing):
            return f"; the checkpoint keys carry an extra prefix {prefix!r}"
    return ""


def load_weights(model: nn.Module, loaded: LoadedCheckpoint, path: str | os.PathLike[str], *,
                 weights: str = "auto", strip_prefix: str | None = None,
                 key_maps: tuple[Any, ...] = (), arch: str | None = None,
                 finite: bool = True) -> Any:
    """Find the weights in ``loaded`` that fit ``model`` exactly and load them.

    The search over nesting keys, bookkeeping entries, prefixes and the architecture's key
    renames is :func:`dtprobe.checkpoints.state_dict.resolve`'s (documented there); a candidate is
    taken
    only when every key and shape fits.

    Parameters
    ----------
    model : nn.Module
        Freshly built model.
    loaded : LoadedCheckpoint
        From :func:`load_checkpoint`.
    path : path-like
        The file, for messages.
    weights : {"auto", "raw", "ema"} or str
        ``--weights``: which weights to take.
    strip_prefix : str, optional
        ``--strip-prefix``: keep only keys with this prefix, removed.
    key_maps : tuple of KeyMap
        The architecture's rename maps.
    arch : str, optional
        The architecture's name, for messages.
    finite : bool, default True
        Refuse chosen weights that contain NaN/Inf.

    Returns
    -------
    dtprobe.checkpoints.state_dict.Candidate
        What was loaded and from where (``.record()`` for the results).

    Raises
    ------
    CheckpointError
        Nothing fits (the message names the keys found and the flag that fixes it), or the
        chosen weights hold NaN/Inf.
    """

    source = loaded.source if loaded.source is not None else loaded.state_dict
    chosen = resolve(source, model, path, weights=weights, strip_prefix=strip_prefix,
                     key_maps=key_maps, arch=arch)
    check_tensors(chosen.state, path)  # e.g. EMA weights, not the default reading checked above
    if finite:
        check_finite(chosen.state, path)
    load_into_model(model, chosen.state, path)
    return chosen


def load_into_model(model: nn.Module, state_dict: Mapping[str, Tensor],
                    path: str | os.PathLike[str]) -> None:
    """Load ``state_dict`` into ``model`` strictly, with a one-line error when it does not fit.

    Missing ``*.num_batches_tracked`` BatchNorm counters (absent from old
    checkpoints) are tolerated; every other missing or unexpected key and every
    shape mismatch is an error.

    Parameters
    ----------
    model : nn.Module
        Freshly built model (architecture and number of classes from the manifest or flags).
    state_dict : mapping of str to Tensor
        Weights from :func:`load_state_dict`.
    path : path-like
        The checkpoint file, for the error message.

    Raises
    ------
    CheckpointError
        Naming the file, the first few offending keys and the fix
        ("pass the right --arch / --num-classes").
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model "
                  f"{tuple(expected[k].shape)})"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = mismatch_message(missing, unexpected, mismatched)
        raise CheckpointError(f"{path}: weights do not fit the {type(model).__name__} that was "
                              f"built ({parts}{_prefix_hint(missing, unexpected)}); "
                              "pass the right --arch / --num-classes (and architecture options)")
    full = dict(state_dict)
    for key, value in expected.items():
        full.setdefault(key, value)  # only num_batches_tracked can be absent here
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({first_line(str(exc))}); "
                              "pass the right --arch / --num-classes") from None
