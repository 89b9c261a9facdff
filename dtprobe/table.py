"""The tidy metrics table: its columns, how each metric is presented, and pure helpers on it.

A leaf module (it imports nothing else of dtprobe but :mod:`dtprobe.errors`), so that
:mod:`dtprobe.results`, :mod:`dtprobe.plotting` and :mod:`dtprobe.analysis` share one schema
without importing each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dtprobe.errors import ConfigError, DtprobeError

# ------------------------------------------------------------------ files of an analysis
#: Folder of a run that holds its analysis; the files and folders below live in it.
ANALYSIS_DIR = "analysis"
#: The tidy table (:data:`TABLE_COLUMNS`).
METRICS_FILE = "metrics.csv"
#: Epoch x epoch linear CKA matrix.
CKA_FILE = "cka_matrix.csv"
#: Checkpoints that could not be analysed (:data:`FAILURE_COLUMNS`).
FAILURES_FILE = "failures.csv"
#: Columns of :data:`FAILURES_FILE`.
FAILURE_COLUMNS: tuple[str, ...] = ("run", "epoch", "path", "reason")
#: Per-checkpoint metric rows, reused when their key matches.
PARTS_DIR = "parts"
#: The sealed feature cache.
FEATURES_DIR = "features"

TABLE_COLUMNS: tuple[str, ...] = (
    "run", "epoch", "step", "metric", "task", "layer", "other_run", "value", "estimator",
    "params", "diagnostics",
)
"""Columns of ``RUN_DIR/analysis/metrics.csv``, in order (see :data:`COLUMN_DOCS`)."""

COLUMN_DOCS: dict[str, str] = {
    "run": "name of the analysed run (its manifest's run_name, else its folder name)",
    "epoch": "epoch of the checkpoint the row was measured on (integer)",
    "step": "optimiser step of that checkpoint; empty only when no manifest records it",
    "metric": "metric name, as in `dtprobe list` (e.g. probe_accuracy, nc1, cka_to_run)",
    "task": "downstream task (factor) a per-task metric was measured on; empty otherwise",
    "layer": "module name for layer-wise rows; empty for the penultimate features",
    "other_run": "for cka_to_run: the run compared with at the same epoch; empty otherwise",
    "value": "the number (float; NaN when the metric could not apply, reason in diagnostics)",
    "estimator": "how the value was computed (e.g. logreg-lbfgs, renyi, linear_cka)",
    "params": "JSON object of the estimator's settings, the same at every checkpoint (what "
              "you would pass to reproduce it)",
    "diagnostics": "JSON object of values computed with it at this checkpoint: chosen C and "
                   "validation accuracy of a probe, data-driven kernel widths, entropies, "
                   "samples used, chance level of an accuracy, errors",
}
"""What each column of the results table holds (also in CONTRIBUTING.md, "The results table")."""

DIAGNOSTIC_KEYS: frozenset[str] = frozenset({
    "C", "val_accuracy", "converged", "unconverged_sweep_fits", "sweep_converged", "n_test",
    "ci_low", "ci_high", "n_iter", "iterations", "entropy_a", "entropy_b",
    "joint_entropy", "sigma_a", "sigma_b", "n", "cap", "final_train_bound", "reference_epoch",
    "head_bias", "other_run_dir", "chance", "error", "warning",
    "null_mean", "null_std", "null_q95", "p_value", "null_expected",
})
"""Keys that estimators report next to their settings but that are computed per checkpoint.

:func:`split_params` moves them out of ``params`` into ``diagnostics``, also when reading a
table written before the ``diagnostics`` column existed.
"""

_REQUIRED = ("run", "epoch", "metric", "value")
_TEXT_COLUMNS = ("run", "metric", "task", "layer", "other_run", "estimator", "params",
                 "diagnostics")


@dataclass(frozen=True)
class MetricInfo:
    """How to present one metric: a readable label, its range/unit and which direction is "best".

    Attributes
    ----------
    label : short human-readable name used in titles and axis labels.
    range : the value range or unit shown next to the label, e.g. ``"[0, 1]"``.
    higher_is_better : ``True`` if the best value of a series is its maximum, ``False`` for the
        minimum (neural-collapse distances shrink as features collapse).
    """

    label: str
    range: str = ""
    higher_is_better: bool = True
    has_best: bool = True
    """False for similarities (CKA), whose maximum is no "best": CKA to the final epoch peaks
    at the final epoch by definition, and CKA to another run at epoch 0 when both runs start
    from the same initialisation."""


METRIC_INFO: dict[str, MetricInfo] = {
    "source_accuracy": MetricInfo("source accuracy", "[0, 1]"),
    "class_separation": MetricInfo("class separation R\u00b2", "[0, 1]"),
    "probe_accuracy": MetricInfo("downstream probe accuracy", "[0, 1]"),
    "knn_accuracy": MetricInfo("k-NN accuracy", "[0, 1]"),
    "cka_to_final": MetricInfo("linear CKA to final epoch", "[0, 1]", has_best=False),
    "cka_to_previous": MetricInfo("linear CKA to previous epoch", "[0, 1]", has_best=False),
    "cka_to_run": MetricInfo("linear CKA to other run", "[0, 1]", has_best=False),
    "nc1": MetricInfo("NC1 within-class variability", "\u2265 0, lower = collapsed", False),
    "nc2_equinorm": MetricInfo("NC2 equinorm (CV of mean norms)", "\u2265 0, lower = collapsed",
                               False),
    "nc2_equiangularity": MetricInfo("NC2 equiangularity", "\u2265 0, lower = collapsed", False),
    "nc2_etf_error": MetricInfo("NC2 distance to simplex ETF", "\u2265 0, lower = collapsed",
                                False),
    "nc3": MetricInfo("NC3 classifier/mean self-duality", "\u2265 0, lower = collapsed", False),
    "nc4": MetricInfo("NC4 classifier vs nearest class centre", "mismatch in [0, 1]", False),
    "rankme": MetricInfo("RankMe effective rank", "[1, d]"),
    "mi_xt": MetricInfo("I(X;T)"),
    "mi_ty": MetricInfo("I(T;Y)"),
    "logme": MetricInfo("LogME", "evidence per sample"),
    "h_score": MetricInfo("H-score", "\u2265 0"),
    "transrate": MetricInfo("TransRate", "nats"),
    "gbc": MetricInfo("GBC (Bhattacharyya)", "\u2264 0"),
    "leep": MetricInfo("LEEP", "\u2264 0"),
    "nce": MetricInfo("NCE (\u2212H(Y|Z))", "\u2264 0"),
    "finetune_accuracy": MetricInfo("fine-tuned accuracy", "[0, 1]"),
    "transfer_accuracy_mean": MetricInfo("mean downstream-dataset probe accuracy", "[0, 1]"),
    "transfer_log_odds_mean": MetricInfo("mean downstream log-odds (t-ReX)", "log(p / (1 - p))"),
    "nleep": MetricInfo("NLEEP", "\u2264 0"),
    "twonn": MetricInfo("TwoNN intrinsic dimension", "> 0"),
    "alpha_req": MetricInfo("alpha-ReQ spectral decay", "> 0, higher = fewer directions"),
    "numerical_rank": MetricInfo("numerical rank", "[0, min(n, d)]"),
    "cdnv": MetricInfo("CDNV", "\u2265 0, lower = collapsed", False),
    "class_mean_uniformity": MetricInfo("class-mean uniformity", "lower = more uniform", False),
}
"""Presentation facts for the metrics ``dtprobe analyze`` writes; unknown metrics get defaults."""

#: Similarity measures between epochs/runs: ``name -> (label, range, higher_is_similar)``
#: (distances: smaller is more similar). The one declaration of a measure's direction:
#: :func:`dtprobe.metrics.registry.register_similarity` reads it from here, and every row of the
#: measure records it. ``linear_cka`` writes the ``cka_to_*`` rows declared above.
SIMILARITY_INFO: dict[str, tuple[str, str, bool]] = {
    "linear_cka": ("linear CKA", "[0, 1]", True),
    "debiased_cka": ("debiased CKA", "\u2264 1", True),
    "mutual_knn": ("mutual k-NN", "[0, 1]", True),
    "cknna": ("CKNNA", "\u2264 1", True),
    "procrustes_distance": ("Procrustes distance", "[0, \u221a2], lower = similar", False),
    "angular_shape_metric": ("angular shape distance", "[0, \u03c0/2] rad, lower = similar",
                             False),
    "svcca": ("SVCCA", "[0, 1]", True),
    "pwcca": ("PWCCA", "[0, 1]", True),
}
for _name, (_label, _range, _higher) in SIMILARITY_INFO.items():
    if _name == "linear_cka":
        continue  # its rows keep their names (cka_to_final ...), declared above
    for _suffix, _what in (("to_final", "to final epoch"), ("to_previous", "to previous epoch"),
                           ("to_run", "to other run")):
        METRIC_INFO[f"{_name}_{_suffix}"] = MetricInfo(f"{_label} {_what}", _range, _higher)

# Few-shot transfer (dtprobe.metrics.fewshot): one metric per classifier and shot count.
_FEWSHOT_LABELS = {"ridge": "ridge", "ncm": "nearest-class-mean"}
_FEWSHOT_NAME = re.compile(r"fewshot_(ridge|ncm)_(\d+)shot")


def _fewshot_info(classifier: str, shots: int) -> MetricInfo:
    return MetricInfo(f"{shots}-shot {_FEWSHOT_LABELS[classifier]} accuracy", "[0, 1]")


for _clf in _FEWSHOT_LABELS:
    for _k in (1, 5, 10, 25):
        METRIC_INFO[f"fewshot_{_clf}_{_k}shot"] = _fewshot_info(_clf, _k)

METRIC_ORDER: tuple[str, ...] = tuple(METRIC_INFO)
"""Canonical display order: discriminability first, then transferability, similarity, collapse."""

_ESTIMATOR_UNITS = {"renyi": "bits", "binning": "bits", "mine": "nats", "kde": "nats",
                    "infonce": "nats"}


def similarity_rows(name: str) -> tuple[str, ...]:
    """The row metrics a similarity measure writes (``<name>_to_final``, ``_to_previous``,
    ``_to_run``; ``cka_to_*`` for ``linear_cka``)."""
    stem = "cka" if name == "linear_cka" else name
    return tuple(f"{stem}_{suffix}" for suffix in ("to_final", "to_previous", "to_run"))


def metric_info(metric: str) -> MetricInfo:
    """Return the :class:`MetricInfo` of ``metric`` (a generic one for unknown names)."""
    if metric in METRIC_INFO:
        return METRIC_INFO[metric]
    few = _FEWSHOT_NAME.fullmatch(metric)
    if few:  # a shot count other than the defaults (--fewshot-shots)
        return _fewshot_info(few.group(1), int(few.group(2)))
    return MetricInfo(metric.replace("_", " "))


def estimator_unit(estimator: str, params: Mapping[str, Any] | None = None) -> str:
    """Unit of an information estimate: ``"bits"`` or ``"nats"`` (``""`` if unknown).

    An explicit ``unit``/``units`` parameter wins, then a logarithm ``base`` (2 = bits,
    e = nats), then the estimator's convention (matrix-based Renyi entropy uses log2,
    MINE's Donsker-Varadhan bound natural logs).
    """
    params = dict(params or {})
    for key in ("unit", "units"):
        if isinstance(params.get(key), str):
            return str(params[key])
    base = params.get("base", params.get("log_base"))
    if base is not None:
        try:
            b = float(base)
        except (TypeError, ValueError):
            b = float("nan")
        if b == 2.0:
            return "bits"
        if abs(b - np.e) < 1e-6 or str(base).lower() in ("e", "natural"):
            return "nats"
    return _ESTIMATOR_UNITS.get(estimator.lower(), "")


def sort_metrics(metrics: Iterable[str]) -> list[str]:
    """Sort metric names into :data:`METRIC_ORDER`; unknown names follow, alphabetically."""
    order = {m: i for i, m in enumerate(METRIC_ORDER)}
    return sorted(set(metrics), key=lambda m: (order.get(m, len(order)), m))


def natural_key(text: str) -> tuple:
    parts: list[Any] = []
    num = ""
    word = ""
    for ch in text:
        if ch.isdigit():
            if word:
                parts.append((1, word))
                word = ""
            num += ch
        else:
            if num:
                parts.append((0, int(num)))
                num = ""
            word += ch
    if num:
        parts.append((0, int(num)))
    if word:
        parts.append((1, word))
    return tuple(parts)


def sort_layers(layers: Iterable[str]) -> list[str]:
    """Sort layer names naturally (``layer2`` before ``layer10``); the penultimate (``""``) last."""
    named = sorted({layer for layer in layers if layer}, key=natural_key)
    return named + ([""] if "" in set(layers) else [])


def normalize_table(table: pd.DataFrame, *, source: str = "table") -> pd.DataFrame:
    """Return a copy of a tidy metrics table with the standard columns and dtypes.

    Missing optional columns (``step``, ``task``, ``layer``, ``other_run``, ``estimator``,
    ``params``, ``diagnostics``) are added; text columns become ``str`` with ``""`` for "not
    applicable"; ``epoch`` becomes int64, ``step`` nullable Int64 and ``value`` float64
    (unparseable values become NaN). Tables written by older versions are read as the current
    schema (:func:`_migrate`): the other run of ``cka_to_run`` moves from ``task`` to
    ``other_run``, computed values from ``params`` to ``diagnostics``.

    Parameters
    ----------
    table : tidy DataFrame with at least ``run, epoch, metric, value``.
    source : name of where the table came from, used in error messages.

    Raises
    ------
    DtprobeError
        If a required column is missing or an epoch is not an integer.
    """
    if not isinstance(table, pd.DataFrame):
        raise ConfigError(f"{source}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise DtprobeError(f"{source} lacks column(s) {', '.join(missing)}; expected columns "
                           f"{', '.join(TABLE_COLUMNS)} (re-run `dtprobe analyze`)")
    df = table.copy()
    for col in _TEXT_COLUMNS:
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].where(df[col].notna(), "").astype(str)
    epochs = pd.to_numeric(df["epoch"], errors="coerce")
    bad = epochs.isna() | (epochs != np.round(epochs))
    if bad.any():
        example = df.loc[bad, "epoch"].iloc[0]
        raise DtprobeError(f"{source}: epoch {example!r} is not an integer; fix or regenerate the "
                           f"table with `dtprobe analyze`")
    df["epoch"] = epochs.astype("int64")
    if "step" not in df.columns:
        df["step"] = pd.NA
    df["step"] = pd.to_numeric(df["step"], errors="coerce").round().astype("Int64")
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    _migrate(df)
    extra = [c for c in df.columns if c not in TABLE_COLUMNS]
    return df[list(TABLE_COLUMNS) + extra].reset_index(drop=True)


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, diagnostics)``: the :data:`DIAGNOSTIC_KEYS` of ``params`` go to the second.

    A legacy ``other_run`` entry (the compared run's folder) becomes ``other_run_dir``.
    """
    settings: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    for key, value in params.items():
        if key == "other_run":
            diagnostics["other_run_dir"] = value
        elif key in DIAGNOSTIC_KEYS:
            diagnostics[key] = value
        else:
            settings[key] = value
    return settings, diagnostics


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=str) if obj else ""


def _migrate(df: pd.DataFrame) -> None:
    """Bring rows of older tables (and cached parts) to the current schema, in place.

    Older tables put the other run of ``cka_to_run`` in ``task`` and computed values in
    ``params``; both are moved to their own columns. Current rows pass unchanged.
    """
    legacy = (df["metric"] == "cka_to_run") & (df["other_run"] == "") & (df["task"] != "")
    if legacy.any():
        df.loc[legacy, "other_run"] = df.loc[legacy, "task"]
        df.loc[legacy, "task"] = ""
    cache: dict[tuple[str, str], tuple[str, str]] = {}
    for pair in set(zip(df["params"], df["diagnostics"], strict=True)):
        settings, diag = split_params(parse_params(pair[0]))
        if not diag:
            continue
        cache[pair] = (_dumps(settings), _dumps({**diag, **parse_params(pair[1])}))
    if cache:
        pairs = list(zip(df["params"], df["diagnostics"], strict=True))
        df["params"] = [cache.get(p, p)[0] for p in pairs]
        df["diagnostics"] = [cache.get(p, p)[1] for p in pairs]


def parse_params(params: str) -> dict[str, Any]:
    """Decode the ``params`` cell of the table (a JSON object string; ``""`` means none)."""
    if not params:
        return {}
    try:
        value = json.loads(params)
    except json.JSONDecodeError:
        return {"params": params}
    return value if isinstance(value, dict) else {"params": value}


def estimator_settings(params: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Split the ``params`` cells of a group of rows into fixed settings and varying keys.

    Parameters
    ----------
    params : JSON-object strings from the ``params`` column (one estimator's rows).

    Returns
    -------
    fixed : parameters with one value in every row that has them (the estimator's settings,
        e.g. a Renyi ``alpha`` or a probe's ``grid_size``).
    varying : sorted names of parameters whose value changes between rows (per-checkpoint
        choices and diagnostics, e.g. the probe's selected ``C`` or a data-driven kernel width).
    """
    decoded = [parse_params(p) for p in dict.fromkeys(params)]
    keys = list(dict.fromkeys(k for d in decoded for k in d))
    fixed: dict[str, Any] = {}
    varying: list[str] = []
    for key in keys:
        values = {json.dumps(d[key], sort_keys=True, default=str) for d in decoded if key in d}
        if len(values) == 1:
            fixed[key] = next(d[key] for d in decoded if key in d)
        else:
            varying.append(key)
    return fixed, sorted(varying)


DOWNSTREAM_PARAM = "downstream"
"""``params`` key marking a row computed on a downstream dataset (its value: the dataset's spec);
such rows have ``task`` = the dataset's name (see :mod:`dtprobe.analysis.downstream`)."""


def downstream_mask(table: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows computed on a downstream dataset (not on the source's images)."""
    params = table["params"].astype(str)
    maybe = params.str.contains(f'"{DOWNSTREAM_PARAM}"', regex=False)
    return maybe & params.where(maybe, "").map(lambda p: DOWNSTREAM_PARAM in parse_params(p))


def transfer_protocols(table: pd.DataFrame) -> dict[str, str]:
    """``protocol -> metric`` of the transfer protocols present in ``table``: ``"linear"``
    (``probe_accuracy``), ``"few-shot"`` (the 10-shot ridge row when present, else the ridge
    row with the most shots, else nearest class mean) and ``"fine-tuned"``
    (``finetune_accuracy``), in that order."""
    if table.empty:
        return {}
    present = set(table["metric"].unique())
    out: dict[str, str] = {}
    if "probe_accuracy" in present:
        out["linear"] = "probe_accuracy"
    for clf in ("ridge", "ncm"):
        shots = sorted(int(m.group(2)) for m in map(_FEWSHOT_NAME.fullmatch, present)
                       if m and m.group(1) == clf)
        if shots:
            out["few-shot"] = f"fewshot_{clf}_{10 if 10 in shots else shots[-1]}shot"
            break
    if "finetune_accuracy" in present:
        out["fine-tuned"] = "finetune_accuracy"
    return out


def downstream_tasks(table: pd.DataFrame) -> list[str]:
    """Names of the downstream datasets in ``table`` (their ``task`` values), sorted."""
    if table.empty or "params" not in table.columns:
        return []
    return sorted(t for t in table.loc[downstream_mask(table), "task"].unique() if t)
