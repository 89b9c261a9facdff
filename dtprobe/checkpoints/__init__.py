"""Checkpoints: from files on disk to weights in a model, never executing code from a file.

One module per step, in import order (each imports only those above it):

- :mod:`~dtprobe.checkpoints.naming`: the file-name schemes recognised, temporary-file names;
- :mod:`~dtprobe.checkpoints.reader`: safe reading (path safety, hashing, restricted unpickling,
  safetensors, tensor checks) into a :class:`LoadedCheckpoint`;
- :mod:`~dtprobe.checkpoints.state_dict`: the readings of a file's weights, and the one that fits;
- :mod:`~dtprobe.checkpoints.fitting`: loading those weights into a model, strictly;
- :mod:`~dtprobe.checkpoints.layouts`: framework layouts (Lightning, Hugging Face, timm, ...),
  their epoch conventions and model records;
- :mod:`~dtprobe.checkpoints.series`: a run's checkpoint series and model without a manifest.

This package re-exports the public names that ``dtprobe.checkpoints`` (formerly one module)
had, so ``from dtprobe.checkpoints import load_checkpoint`` keeps working.
"""

from __future__ import annotations

from dtprobe.checkpoints.fitting import load_into_model, load_weights
from dtprobe.checkpoints.naming import KNOWN_NAMINGS, TEMP_SUFFIXES, is_temporary_name
from dtprobe.checkpoints.reader import (
    ALLOWED_DTYPES,
    MAX_CHECKPOINT_BYTES,
    MAX_TENSOR_ELEMENTS,
    PREFIXES,
    WRAPPER_KEYS,
    CheckpointBytes,
    LoadedCheckpoint,
    check_finite,
    check_tensors,
    load_checkpoint,
    load_state_dict,
    read_checkpoint_bytes,
    read_checkpoint_meta,
    resolve_inside,
    safe_torch_load,
    verify_sha256,
)
from dtprobe.checkpoints.series import (
    CheckpointSeries,
    InferredCheckpoint,
    InferredRun,
    infer_checkpoint_series,
    infer_run,
)

__all__ = [
    "ALLOWED_DTYPES",
    "KNOWN_NAMINGS",
    "MAX_CHECKPOINT_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "PREFIXES",
    "TEMP_SUFFIXES",
    "WRAPPER_KEYS",
    "CheckpointBytes",
    "CheckpointSeries",
    "InferredCheckpoint",
    "InferredRun",
    "LoadedCheckpoint",
    "check_finite",
    "check_tensors",
    "infer_checkpoint_series",
    "infer_run",
    "is_temporary_name",
    "load_checkpoint",
    "load_into_model",
    "load_state_dict",
    "load_weights",
    "read_checkpoint_bytes",
    "read_checkpoint_meta",
    "resolve_inside",
    "safe_torch_load",
    "verify_sha256",
]
