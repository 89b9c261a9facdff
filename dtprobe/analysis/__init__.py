"""The analysis pipeline: run directory -> features per checkpoint -> metrics -> tidy table.

``analyze(run_dir)`` resolves the checkpoint series (manifest, or file names plus flags),
loads each checkpoint safely, extracts features once (cached), computes the registered
per-epoch metrics and the across-epoch CKA, and writes ``RUN_DIR/analysis/``:

- ``metrics.csv``: the tidy table (``run, epoch, step, metric, task, layer, value, estimator,
  params``);
- ``cka_matrix.csv``: the epoch x epoch linear CKA matrix of the penultimate features;
- ``failures.csv``: checkpoints that could not be analysed, with the reason (if any);
- ``tradeoff.png``: source accuracy and downstream probe accuracy against epoch.

Reliability (the checkpoints are often someone else's files, analysed on shared machines where
jobs get killed):

- checkpoints load only through :mod:`dtprobe.checkpoints.reader` (``weights_only`` or safetensors),
  each read once into memory: the sha256 of that buffer is verified against the manifest and
  the tensors are built from the same buffer; the file actually opened must lie inside the run
  directory (symbolic links out of it only with ``follow_symlinks``), and tensors are validated
  (dtype, layout, device, storage) before use;
- any exception while handling one checkpoint (missing, corrupt, unsafe, malformed tensors,
  wrong shapes, NaN/Inf weights or features, or unforeseen) is recorded in ``failures.csv`` with
  its one-line reason and the others are analysed; operating-system errors (disk full,
  read-only) stop the analysis with one line instead;
- features (``analysis/features/``) and per-checkpoint rows (``analysis/parts/``) are written
  atomically (unpredictable temporary names, never through a planted link) and sealed with an
  HMAC bound to their key (:mod:`dtprobe.features.integrity`), so an analysis killed at any moment
  (even
  ``SIGKILL``) resumes where it stopped, recomputes only what is missing and ends with the same
  table, and a forged entry is recomputed; ``use_cache=False`` reuses neither;
- ``analysis/`` and its folders must be real folders inside the run;
- an exclusive lock on ``analysis/.lock`` serialises analyses of one run: a second one waits
  (saying so), or with ``wait=False`` stops with "run is busy".

The modules follow the data flow:

- :mod:`~dtprobe.analysis.plan`: run directory -> :class:`RunPlan` (checkpoints, model, data)
  and the :class:`AnalysisOptions`; names and parameters checked before any work;
- :mod:`~dtprobe.analysis.data`: the evaluation dataset decoded once (:class:`EvalData`);
- :mod:`~dtprobe.analysis.features`: one checkpoint verified, loaded safely, features extracted
  once into the feature cache;
- :mod:`~dtprobe.analysis.epoch_metrics`: the registered per-epoch metrics as tidy rows;
- :mod:`~dtprobe.analysis.similarity`: across-epoch (and across-run) linear CKA, streamed;
- :mod:`~dtprobe.analysis.rows`: rows -> ``metrics.csv`` and the trade-off chart;
- :mod:`~dtprobe.analysis.locks` and :mod:`~dtprobe.analysis.resume`: the run lock and the
  stores that make an analysis resumable with flat memory;
- :mod:`~dtprobe.analysis.pipeline`: :func:`analyze` tying them together (also per torchrun rank).
"""

from dtprobe.analysis.data import MAX_MI_INPUTS, EvalData, prepare_data
from dtprobe.analysis.epoch_metrics import PARTS_VERSION
from dtprobe.analysis.features import check_model
from dtprobe.analysis.locks import LOCK_FILE, remove_stale_temp_files, run_lock
from dtprobe.analysis.pipeline import AnalysisStats, analyze, analyze_plan
from dtprobe.analysis.plan import (
    AnalysisOptions,
    PlannedCheckpoint,
    RunPlan,
    check_plan,
    plan_run,
)
from dtprobe.analysis.resume import EpochFeatures, PartStore, ReadThroughCache
from dtprobe.analysis.rows import COLUMNS, FAILURE_COLUMNS
from dtprobe.analysis.similarity import streamed_cka_matrix

__all__ = [
    "AnalysisOptions",
    "AnalysisStats",
    "COLUMNS",
    "EpochFeatures",
    "EvalData",
    "FAILURE_COLUMNS",
    "LOCK_FILE",
    "MAX_MI_INPUTS",
    "PARTS_VERSION",
    "PartStore",
    "PlannedCheckpoint",
    "ReadThroughCache",
    "RunPlan",
    "analyze",
    "analyze_plan",
    "check_model",
    "check_plan",
    "plan_run",
    "prepare_data",
    "remove_stale_temp_files",
    "run_lock",
    "streamed_cka_matrix",
]
