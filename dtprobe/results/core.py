"""Results of ``dtprobe analyze``: the tidy metrics table, run manifests and temporal CKA matrices.

The analysis pipeline writes, per run directory::

    RUN_DIR/manifest.json              how the run was trained (run_name, model, dataset, ...)
    RUN_DIR/analysis/metrics.csv       tidy table, one row per run x epoch x metric x task x layer
    RUN_DIR/analysis/cka_matrix.csv    epoch x epoch temporal linear CKA

:func:`load_results` reads those files (it never recomputes anything) and
:func:`compare` puts several runs side by side, typically a cross-entropy run
and a contrastive-temporal-coding (CTC) run, to show the
discriminability-transferability trade-off of Kornblith et al. (2021) and
Cui et al. (2022) in one picture.

Example
-------
>>> from dtprobe.results import compare
>>> res = compare(["runs/ce", "runs/ctc"])           # doctest: +SKIP
>>> res.wide("ce")[["source_accuracy", "probe_accuracy[colour]"]]  # doctest: +SKIP
>>> res.summary()                                      # doctest: +SKIP
>>> res.plot_tradeoff()                                # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import checkpoints_manifest as cm
from dtprobe.errors import ConfigError, DtprobeError
from dtprobe.references import with_references
from dtprobe.table import (
    ANALYSIS_DIR,
    CKA_FILE,
    FAILURE_COLUMNS,
    FAILURES_FILE,
    METRIC_ORDER,
    METRICS_FILE,
    TABLE_COLUMNS,
    downstream_mask,
    downstream_tasks,
    estimator_settings,
    metric_info,
    natural_key,
    normalize_table,
    parse_params,
    sort_metrics,
    transfer_protocols,
)

__doc__ = with_references(__doc__, "kornblith2021", "cui2022")

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MANIFEST_FILE = cm.MANIFEST_NAME


def _column_name(metric: str, task: str, layer: str, estimator: str, multi_estimator: bool,
                 other_run: str = "") -> str:
    name = metric
    if multi_estimator and estimator:
        name += f"({estimator})"
    if task:
        name += f"[{task}]"
    if other_run:
        name += f"[vs {other_run}]"
    if layer:
        name += f"@{layer}"
    return name


class Results:
    """The analysis results of one or more runs, for notebooks, plots and reports.

    Parameters
    ----------
    table : tidy DataFrame with columns ``run, epoch, step, metric, task, layer, value,
        estimator, params`` (only ``run, epoch, metric, value`` are required).
    manifests : run name -> run manifest (plain dict from ``RUN_DIR/manifest.json``).
    cka : run name -> epoch x epoch temporal linear-CKA DataFrame.
    sources : run name -> directory the run was loaded from (informational).
    failures : checkpoints the analysis could not process, columns ``run, epoch, path,
        reason`` (from ``RUN_DIR/analysis/failures.csv``); empty when none failed.

    Notes
    -----
    The constructor only validates and stores; nothing is read from disk or recomputed.
    Use :func:`load_results` / :func:`compare` to read analysed run directories.

    References
    ----------
    Kornblith et al., "Why do better loss functions lead to less transferable features?",
    NeurIPS 2021; Cui et al., "Discriminability-transferability trade-off: an
    information-theoretic perspective", ECCV 2022.
    """

    def __init__(self, table: pd.DataFrame,
                 manifests: Mapping[str, Mapping[str, Any]] | None = None,
                 cka: Mapping[str, pd.DataFrame] | None = None,
                 sources: Mapping[str, str | Path] | None = None,
                 failures: pd.DataFrame | None = None) -> None:
        self._table = normalize_table(table)
        self._manifests = {str(k): dict(v) for k, v in (manifests or {}).items()}
        self._cka = {str(k): v for k, v in (cka or {}).items()}
        self._sources = {str(k): Path(v) for k, v in (sources or {}).items()}
        self.failures = (pd.DataFrame(columns=list(FAILURE_COLUMNS)) if failures is None
                         else failures)
        """Checkpoints the analysis skipped: ``run, epoch, path, reason`` (may be empty)."""

    # ------------------------------------------------------------------ data access
    @property
    def table(self) -> pd.DataFrame:
        """The tidy table (shared, not copied: modify a ``.copy()`` of it)."""
        return self._table

    @property
    def runs(self) -> list[str]:
        """Run names, in order of first appearance (runs with only a manifest or CKA follow)."""
        names = list(dict.fromkeys(self._table["run"].tolist()))
        for extra in list(self._manifests) + list(self._cka):
            if extra not in names:
                names.append(extra)
        return names

    @property
    def manifests(self) -> dict[str, dict[str, Any]]:
        """Run name -> manifest dict (runs without ``manifest.json`` are absent)."""
        return self._manifests

    @property
    def cka_matrices(self) -> dict[str, pd.DataFrame]:
        """Run name -> epoch x epoch temporal linear-CKA matrix (index and columns are epochs)."""
        return self._cka

    @property
    def sources(self) -> dict[str, Path]:
        """Run name -> run directory it was loaded from (empty for in-memory results)."""
        return self._sources

    @property
    def metrics(self) -> list[str]:
        """Metric names present in the table, in display order."""
        return sort_metrics(self._table["metric"].unique())

    def tasks(self, metric: str = "probe_accuracy") -> list[str]:
        """Sorted task names that ``metric`` has rows for (e.g. the downstream probe tasks)."""
        rows = self._table[self._table["metric"] == metric]
        return sorted(t for t in rows["task"].unique() if t)

    def epochs(self, run: str | None = None) -> list[int]:
        """Sorted epochs present in the table (for one run, or for any run)."""
        df = self._table if run is None else self._select_run(run)
        return sorted(int(e) for e in df["epoch"].unique())

    def _select_run(self, run: str) -> pd.DataFrame:
        if run not in self.runs:
            raise ConfigError(f"run {run!r} not in results; available runs: "
                              f"{', '.join(self.runs) or '(none)'}")
        return self._table[self._table["run"] == run]

    def wide(self, run: str | None = None, task: str | None = None) -> pd.DataFrame:
        """Pivot the tidy table to epoch x metric.

        Parameters
        ----------
        run : run name; ``None`` keeps every run (index ``epoch`` if there is one run,
            otherwise a ``(run, epoch)`` MultiIndex).
        task : ``None`` keeps every task, as columns ``metric[task]`` (e.g.
            ``probe_accuracy[colour]``); a task name keeps only that task's rows of tasked
            metrics and names them by the bare metric (``probe_accuracy``).

        Returns
        -------
        DataFrame
            One row per epoch, one column per metric (layer-wise rows as ``metric@layer``;
            ``metric(estimator)`` when one metric was computed with several estimators; CKA to
            another run as ``cka_to_run[vs OTHER]``).
            Columns follow :data:`METRIC_ORDER`; missing values are NaN; duplicate rows of
            the same key are averaged.
        """
        df = self._table if run is None else self._select_run(run)
        if task is not None:
            tasked = df["task"] != ""
            if task not in set(df.loc[tasked, "task"]):
                raise ConfigError(f"task {task!r} not in results; available tasks: "
                                  f"{', '.join(sorted(set(df.loc[tasked, 'task']))) or '(none)'}")
            df = df[~tasked | (df["task"] == task)].copy()
            df["task"] = ""
        multi_run = run is None and df["run"].nunique() > 1
        index = ["run", "epoch"] if multi_run else ["epoch"]
        if df.empty:
            return pd.DataFrame(index=pd.Index([], name="epoch"))
        n_est = df.groupby("metric")["estimator"].nunique()
        multi = set(n_est[n_est > 1].index)
        keys = df[["metric", "task", "layer", "estimator", "other_run"]].drop_duplicates()
        order = {m: i for i, m in enumerate(METRIC_ORDER)}
        keys = keys.assign(
            _m=keys["metric"].map(lambda m: (order.get(m, len(order)), m)),
            _l=keys["layer"].map(lambda lay: (lay != "", natural_key(lay))),
        ).sort_values(["_m", "_l", "task", "other_run", "estimator"])
        names = {
            (r.metric, r.task, r.layer, r.estimator, r.other_run):
                _column_name(r.metric, r.task, r.layer, r.estimator, r.metric in multi,
                             r.other_run)
            for r in keys.itertuples()
        }
        col = [names[k] for k in zip(df["metric"], df["task"], df["layer"], df["estimator"],
                                     df["other_run"], strict=True)]
        work = df.assign(_col=col)
        out = work.pivot_table(index=index, columns="_col", values="value", aggfunc="mean",
                               dropna=False, sort=True)
        ordered = list(dict.fromkeys(names.values()))
        out = out.reindex(columns=[c for c in ordered if c in out.columns])
        out.columns.name = None
        return out

    def summary(self) -> pd.DataFrame:
        """First, best and last value of every run x metric x task x layer x estimator series.

        Returns
        -------
        DataFrame
            Columns ``run, metric, task, layer, estimator, best_is, first_epoch, first,
            best_epoch, best, last_epoch, last, change`` where ``best_is`` is ``"max"`` or
            ``"min"`` (see :data:`METRIC_INFO`; ``""`` with NaN ``best``/``best_epoch`` for
            the CKA similarities, which have no best), ``change = last - first``. NaN values are
            skipped; ties for the best value go to the earliest epoch. For the downstream
            probes (``probe_accuracy``) ``best_epoch`` is the epoch where the probe peaked;
            :meth:`probe_peaks` gives those rows with the drop after the peak.
        """
        cols = ["run", "metric", "task", "other_run", "layer", "estimator", "best_is",
                "first_epoch", "first", "best_epoch", "best", "last_epoch", "last", "change"]
        keys = ["run", "metric", "task", "other_run", "layer", "estimator"]
        df = self._table[np.isfinite(self._table["value"])]
        if df.empty:
            return pd.DataFrame(columns=cols)
        # average duplicate rows of one key so each epoch contributes one value
        df = (df.groupby([*keys, "epoch"], sort=False)
              ["value"].mean().reset_index().sort_values("epoch", kind="stable"))
        rows = []
        for (run, metric, task, other, layer, est), g in df.groupby(keys, sort=False):
            info = metric_info(metric)
            values = g["value"].to_numpy()
            epochs = g["epoch"].to_numpy()
            best_i = int(np.argmax(values) if info.higher_is_better else np.argmin(values))
            # similarities (CKA) have no "best": their maximum is at the reference epoch, or at
            # epoch 0 for two runs that share their initialisation
            best_epoch = int(epochs[best_i]) if info.has_best else np.nan
            rows.append({
                "run": run, "metric": metric, "task": task, "other_run": other, "layer": layer,
                "estimator": est,
                "best_is": ("max" if info.higher_is_better else "min") if info.has_best else "",
                "first_epoch": int(epochs[0]), "first": float(values[0]),
                "best_epoch": best_epoch,
                "best": float(values[best_i]) if info.has_best else np.nan,
                "last_epoch": int(epochs[-1]), "last": float(values[-1]),
                "change": float(values[-1] - values[0]),
            })
        out = pd.DataFrame(rows, columns=cols)
        run_order = {r: i for i, r in enumerate(self.runs)}
        order = {m: i for i, m in enumerate(METRIC_ORDER)}
        out = out.assign(
            _r=out["run"].map(run_order),
            _m=out["metric"].map(lambda m: (order.get(m, len(order)), m)),
            _l=out["layer"].map(lambda lay: (lay != "", natural_key(lay))),
        ).sort_values(["_r", "_m", "_l", "task", "other_run", "estimator"]
                      ).drop(columns=["_r", "_m", "_l"])
        return out.reset_index(drop=True)

    def probe_peaks(self, metric: str = "probe_accuracy",
                    source_metric: str = "source_accuracy") -> pd.DataFrame:
        """Where each downstream probe peaked, and what training past the peak cost.

        Returns
        -------
        DataFrame
            One row per run x task: ``run, task, peak_epoch, peak, last_epoch, last, drop``
            (``peak - last``, the transferability lost after the peak) and
            ``source_at_peak`` / ``source_last`` (source accuracy at those epochs, NaN if not
            measured), the two ends of the trade-off of Kornblith et al. (2021).
        """
        cols = ["run", "task", "peak_epoch", "peak", "last_epoch", "last", "drop",
                "source_at_peak", "source_last"]
        s = self.summary()
        s = s[(s["metric"] == metric) & (s["layer"] == "")]
        src = self._table[(self._table["metric"] == source_metric) & (self._table["layer"] == "")
                          & (self._table["task"] == "")]
        src_map = src.groupby(["run", "epoch"])["value"].mean().to_dict()
        rows = []
        for r in s.itertuples():
            rows.append({
                "run": r.run, "task": r.task, "peak_epoch": int(r.best_epoch), "peak": r.best,
                "last_epoch": r.last_epoch, "last": r.last, "drop": r.best - r.last,
                "source_at_peak": src_map.get((r.run, r.best_epoch), np.nan),
                "source_last": src_map.get((r.run, r.last_epoch), np.nan),
            })
        return pd.DataFrame(rows, columns=cols)

    def protocol_peaks(self) -> pd.DataFrame:
        """The epoch of best transfer under each protocol; see :func:`protocol_peaks`."""
        return protocol_peaks(self._table)

    def downstream_datasets(self) -> list[str]:
        """Names of the downstream (transfer) datasets analysed, i.e. their ``task`` values."""
        return downstream_tasks(self._table)

    def transfer(self, run: str | None = None) -> pd.DataFrame:
        """Cross-dataset transfer per epoch: linear-probe accuracy on every downstream dataset,
        their mean and mean log-odds (columns ``run, epoch, <dataset>..., mean, log_odds``)."""
        return transfer_table(self._table if run is None else self._select_run(run))

    def score_rank_correlation(self, target: str = "probe_accuracy",
                               scores: Sequence[str] | None = None) -> pd.DataFrame:
        """How well each transferability score predicts transfer over training; see
        :func:`score_rank_correlation`."""
        return score_rank_correlation(self._table, target=target, scores=scores)

    def estimators(self) -> pd.DataFrame:
        """How every metric was estimated, so each number can be traced.

        Returns
        -------
        DataFrame
            One row per ``metric, estimator`` with ``settings`` (JSON object of the ``params``
            that are the same in every row), ``varying`` (names of ``params`` that change from
            checkpoint to checkpoint; normally none) and ``diagnostics`` (names of the values
            computed per checkpoint, e.g. the probe's chosen ``C``, kept in the
            ``diagnostics`` column, not settings). Metrics without estimator or parameters are
            left out.
        """
        cols = ["metric", "estimator", "settings", "varying", "diagnostics"]
        df = self._table[(self._table["estimator"] != "") | (self._table["params"] != "")]
        rows = []
        for (metric, est), g in df.groupby(["metric", "estimator"], sort=False):
            fixed, varying = estimator_settings(g["params"])
            diag = sorted({k for d in dict.fromkeys(g["diagnostics"]) for k in parse_params(d)})
            rows.append({"metric": metric, "estimator": est,
                         "settings": json.dumps(fixed, sort_keys=True, default=str) if fixed
                         else "", "varying": ", ".join(varying),
                         "diagnostics": ", ".join(diag)})
        out = pd.DataFrame(rows, columns=cols)
        order = {m: i for i, m in enumerate(METRIC_ORDER)}
        out = out.assign(_m=out["metric"].map(lambda m: (order.get(m, len(order)), m)))
        return out.sort_values(["_m", "estimator"]).drop(columns="_m").reset_index(drop=True)

    # ------------------------------------------------------------------ plots
    def plot_tradeoff(self, x: str = "source_accuracy", y: str = "probe_accuracy",
                      task: str | None = None, ax: Axes | None = None) -> Axes:
        """Discriminability vs transferability; see :func:`dtprobe.plotting.plot_tradeoff`."""
        from dtprobe import plotting

        return plotting.plot_tradeoff(self._table, x=x, y=y, task=task, ax=ax)

    def plot_metrics(self, metrics: Sequence[str] | None = None, ax: Any = None) -> Figure:
        """Small multiples of metrics against epoch; see :func:`dtprobe.plotting.plot_metrics`."""
        from dtprobe import plotting

        return plotting.plot_metrics(self._table, metrics=metrics, ax=ax)

    def plot_information_plane(self, estimator: str | None = None,
                               ax: Axes | None = None) -> Axes:
        """I(X;T) vs I(T;Y); see :func:`dtprobe.plotting.plot_information_plane`."""
        from dtprobe import plotting

        return plotting.plot_information_plane(self._table, estimator=estimator, ax=ax)

    def plot_cka(self, run: str | None = None, ax: Axes | None = None) -> Axes | Figure:
        """Temporal CKA heatmap of ``run`` (an Axes), or of every run side by side (a Figure)."""
        from dtprobe import plotting

        if run is not None:
            if run not in self._cka:
                raise ConfigError(f"no temporal CKA matrix for run {run!r}; runs with one: "
                                  f"{', '.join(self._cka) or '(none)'}")
            return plotting.plot_cka(self._cka[run], ax=ax, title=f"temporal CKA: {run}")
        return plotting.plot_cka_grid(self._cka)

    def plot_cka_to_final(self, ax: Axes | None = None) -> Axes:
        """CKA of every epoch to the final one; see :func:`dtprobe.plotting.plot_cka_to_final`."""
        from dtprobe import plotting

        return plotting.plot_cka_to_final(self._table, ax=ax)

    def plot_tradeoff_over_epochs(self, ax: Axes | None = None) -> Axes:
        """Source and probe accuracy vs epoch (``plotting.plot_tradeoff_over_epochs``)."""
        from dtprobe import plotting

        return plotting.plot_tradeoff_over_epochs(self._table, ax=ax)

    def save_figures(self, out_dir: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
        """Write every available chart; see :func:`dtprobe.plotting.save_all_figures`."""
        from dtprobe import plotting

        return plotting.save_all_figures(self, out_dir, formats=formats)

    def write_report(self, out_html: str | Path, title: str | None = None) -> Path:
        """Write the self-contained HTML report; see :func:`dtprobe.results.report.write_report`."""
        from dtprobe.results.report import write_report

        return write_report(self, out_html, title=title)

    def __repr__(self) -> str:
        epochs = self.epochs()
        span = f"epochs {epochs[0]}..{epochs[-1]}" if epochs else "no epochs"
        return (f"Results(runs={self.runs}, {span}, {len(self.metrics)} metrics, "
                f"{len(self._table)} rows)")


# ---------------------------------------------------------------------- loading
def _analysis_paths(path: Path) -> tuple[Path, Path]:
    """Return (run_dir, metrics_csv) for a run dir, its analysis dir, or the CSV itself."""
    if path.is_file() or path.suffix == ".csv":
        csv = path
        analysis = csv.parent
        run_dir = analysis.parent if analysis.name == ANALYSIS_DIR else analysis
    elif path.name == ANALYSIS_DIR and (path / METRICS_FILE).exists():
        csv = path / METRICS_FILE
        run_dir = path.parent
    else:
        csv = path / ANALYSIS_DIR / METRICS_FILE
        run_dir = path
    if not csv.is_file():
        raise DtprobeError(f"no analysis in {path}; run `dtprobe analyze {path}` first")
    return run_dir, csv


def _read_table(csv: Path) -> pd.DataFrame:
    try:
        raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DtprobeError(f"cannot read {csv}: {exc}; re-run `dtprobe analyze`") from exc
    return normalize_table(raw, source=str(csv))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DtprobeError(f"{path} is not valid JSON ({exc}); restore or regenerate it") from exc
    if not isinstance(data, dict):
        raise DtprobeError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_cka_matrix(path: str | Path) -> pd.DataFrame:
    """Read an epoch x epoch CKA matrix CSV (first column = epochs), integer labels if possible."""
    path = Path(path)
    try:
        mat = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DtprobeError(f"cannot read {path}: {exc}; re-run `dtprobe analyze`") from exc

    def _ints(labels: pd.Index) -> pd.Index:
        num = pd.to_numeric(pd.Series(labels.astype(str)), errors="coerce")
        if num.notna().all() and (num == num.round()).all():
            return pd.Index(num.astype("int64").tolist(), name="epoch")
        return pd.Index(labels, name="epoch")

    mat.index = _ints(mat.index)
    mat.columns = _ints(mat.columns)
    return mat.astype("float64")


def _load_one(path: Path) -> Results:
    run_dir, csv = _analysis_paths(path)
    table = _read_table(csv)
    manifest = _read_manifest(run_dir / MANIFEST_FILE)
    names = [n for n in dict.fromkeys(table["run"].tolist()) if n]
    fallback = (manifest or {}).get("run_name") or run_dir.resolve().name
    if (table["run"] == "").any():
        table.loc[table["run"] == "", "run"] = str(fallback)
        names = list(dict.fromkeys(table["run"].tolist()))
    main = names[0] if len(names) == 1 else str(fallback)
    manifests = {main: manifest} if manifest is not None else {}
    cka_path = csv.parent / CKA_FILE
    cka = {main: read_cka_matrix(cka_path)} if cka_path.is_file() else {}
    failures = None
    fail_path = csv.parent / FAILURES_FILE
    if fail_path.is_file():
        try:
            failures = pd.read_csv(fail_path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            failures = None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DtprobeError(f"cannot read {fail_path}: {exc}; delete it and re-run "
                               f"`dtprobe analyze`") from exc
        if failures is not None and "run" not in failures.columns:
            failures.insert(0, "run", main)
    return Results(table, manifests=manifests, cka=cka, sources={n: run_dir for n in names},
                   failures=failures)


def load_results(path_or_paths: str | Path | Iterable[str | Path]) -> Results:
    """Load analysed run(s) from disk without recomputing anything.

    Parameters
    ----------
    path_or_paths : a run directory (containing ``analysis/metrics.csv``), its ``analysis``
        directory, the ``metrics.csv`` file itself, or a list of those (combined with
        :func:`compare`).

    Returns
    -------
    Results
        Table, manifests (from ``RUN_DIR/manifest.json`` when present) and temporal CKA
        matrices (from ``analysis/cka_matrix.csv`` when present).

    Raises
    ------
    DtprobeError
        ``no analysis in X; run `dtprobe analyze X` first`` when the table is missing, or a
        one-line message naming a malformed file.
    """
    if isinstance(path_or_paths, (str, Path)):
        return _load_one(Path(path_or_paths))
    return compare(path_or_paths)


def _unique_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


def compare(paths: Iterable[str | Path | Results]) -> Results:
    """Combine several runs (paths as for :func:`load_results`, or :class:`Results`) into one.

    Runs keep their names; a name already taken by an earlier entry gets a ``-2``, ``-3`` ...
    suffix (in the table, the manifests and the CKA matrices alike), so two runs both called
    ``run`` become ``run`` and ``run-2``.

    Raises
    ------
    ConfigError
        If ``paths`` is empty.
    """
    items = [paths] if isinstance(paths, (str, Path, Results)) else list(paths)
    if not items:
        raise ConfigError("compare() needs at least one run directory")
    tables: list[pd.DataFrame] = []
    manifests: dict[str, dict[str, Any]] = {}
    cka: dict[str, pd.DataFrame] = {}
    sources: dict[str, Path] = {}
    failures: list[pd.DataFrame] = []
    taken: set[str] = set()
    for item in items:
        res = item if isinstance(item, Results) else _load_one(Path(item))
        rename = {}
        for name in res.runs:
            new = _unique_name(name, taken)
            taken.add(new)
            rename[name] = new
        table = res.table.copy()
        table["run"] = table["run"].map(rename)
        tables.append(table)
        if len(res.failures):
            fail = res.failures.copy()
            if "run" in fail.columns:
                fail["run"] = fail["run"].replace(rename)
            failures.append(fail)
        for old, new in rename.items():
            if old in res.manifests:
                manifests[new] = res.manifests[old]
            if old in res.cka_matrices:
                cka[new] = res.cka_matrices[old]
            if old in res.sources:
                sources[new] = res.sources[old]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TABLE_COLUMNS)
    return Results(table, manifests=manifests, cka=cka, sources=sources,
                   failures=pd.concat(failures, ignore_index=True) if failures else None)


#: Scores rank-correlated with downstream probe accuracy by :func:`score_rank_correlation`:
#: the transferability scores, the kNN probe, and source accuracy as the naive baseline.
RANKED_SCORES: tuple[str, ...] = ("logme", "h_score", "transrate", "gbc", "leep", "nce",
                                  "knn_accuracy", "source_accuracy")


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two equally long sequences (NaN pairs dropped).

    ``(n_c - n_d) / sqrt((n_0 - t_x)(n_0 - t_y))`` with ``n_c``/``n_d`` the concordant and
    discordant pairs, ``n_0 = n(n-1)/2`` and ``t_x``, ``t_y`` the pairs tied in ``x``, in ``y``
    (Kendall 1945); NaN with fewer than 2 pairs or a constant sequence.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = a.size
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n0 = n * (n - 1) / 2
    tx, ty = float(np.sum(sa == 0)), float(np.sum(sb == 0))
    denom = np.sqrt((n0 - tx) * (n0 - ty))
    return float(np.sum(sa * sb) / denom) if denom > 0 else float("nan")


def protocol_peaks(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and downstream dataset, the epoch of best transfer under each protocol.

    The protocols are those of :func:`dtprobe.table.transfer_protocols` (linear probe, few-shot,
    fine-tuned; Islam et al. 2021 measure all three). Returns one row per run x dataset x
    protocol: ``run, dataset, protocol, metric, best_epoch, best, last_epoch, last, drop``
    (``best - last``), plus ``same_best_epoch`` (whether every protocol measured for that run
    and dataset peaks at the same epoch).
    """
    cols = ["run", "dataset", "protocol", "metric", "best_epoch", "best", "last_epoch", "last",
            "drop", "same_best_epoch"]
    down = table[downstream_mask(table) & (table["layer"] == "")] if not table.empty else table
    down = down[np.isfinite(down["value"])] if not down.empty else down
    protocols = transfer_protocols(down) if not down.empty else {}
    rows = []
    for proto, metric in protocols.items():
        sub = down[down["metric"] == metric]
        for (run, dataset), g in sub.groupby(["run", "task"], sort=True):
            s = g.groupby("epoch")["value"].mean().sort_index()
            best = int(s.index[int(np.argmax(s.to_numpy()))])
            rows.append({"run": run, "dataset": dataset, "protocol": proto, "metric": metric,
                         "best_epoch": best, "best": float(s.max()),
                         "last_epoch": int(s.index[-1]), "last": float(s.iloc[-1]),
                         "drop": float(s.max() - s.iloc[-1])})
    out = pd.DataFrame(rows, columns=cols[:-1])
    if out.empty:
        return pd.DataFrame(columns=cols)
    same = out.groupby(["run", "dataset"])["best_epoch"].transform("nunique") == 1
    return out.assign(same_best_epoch=same.astype(bool))[cols]


def score_rank_correlation(table: pd.DataFrame, target: str = "probe_accuracy",
                           scores: Sequence[str] | None = None) -> pd.DataFrame:
    """Kendall tau, per run, downstream dataset and score, between the score and the dataset's
    ``target`` (linear-probe accuracy) across the epochs of the run.

    A score that predicts transfer over training has tau near +1: choosing a checkpoint by it
    would pick the checkpoints that transfer best. ``source_accuracy`` (not computed on the
    downstream dataset) is the baseline a score should beat; it is paired with each dataset's
    accuracy at the same epochs.

    Parameters
    ----------
    table : tidy results table (rows of downstream datasets carry ``params["downstream"]``).
    target : the metric the scores should predict.
    scores : metrics to rank-correlate (default :data:`RANKED_SCORES`, those present).

    Returns
    -------
    DataFrame
        Columns ``run, dataset, score, tau, n_epochs``; the last rows per run and score,
        ``dataset = "mean"``, average tau over the datasets.
    """
    cols = ["run", "dataset", "score", "tau", "n_epochs"]
    df = normalize_table(table, source="score_rank_correlation")
    df = df[(df["layer"] == "") & np.isfinite(df["value"])]
    if df.empty:
        return pd.DataFrame(columns=cols)
    down = df[downstream_mask(df)]
    wanted = list(RANKED_SCORES if scores is None else scores)
    rows = []
    for run in dict.fromkeys(df["run"]):
        dr = down[down["run"] == run]
        src = df[(df["run"] == run) & (df["metric"] == "source_accuracy") & (df["task"] == "")]
        src = src.groupby("epoch")["value"].mean()
        per_score: dict[str, list[float]] = {}
        for ds in sorted(t for t in dr["task"].unique() if t):
            rd = dr[dr["task"] == ds]
            acc = rd[rd["metric"] == target].groupby("epoch")["value"].mean()
            if acc.empty:
                continue
            for score in wanted:
                s = src if score == "source_accuracy" else (
                    rd[rd["metric"] == score].groupby("epoch")["value"].mean())
                both = pd.concat([s.rename("s"), acc.rename("a")], axis=1, join="inner")
                if both.empty:
                    continue
                tau = kendall_tau(both["s"].to_numpy(), both["a"].to_numpy())
                rows.append({"run": run, "dataset": ds, "score": score, "tau": tau,
                             "n_epochs": len(both)})
                per_score.setdefault(score, []).append(tau)
        for score, taus in per_score.items():
            finite = [x for x in taus if np.isfinite(x)]
            rows.append({"run": run, "dataset": "mean", "score": score,
                         "tau": float(np.mean(finite)) if finite else float("nan"),
                         "n_epochs": int(min(r["n_epochs"] for r in rows
                                             if r["run"] == run and r["score"] == score
                                             and r["dataset"] != "mean"))})
    return pd.DataFrame(rows, columns=cols)


def transfer_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and epoch: downstream probe accuracy on each dataset, ``mean`` and ``log_odds``
    (the aggregate rows ``transfer_accuracy_mean`` / ``transfer_log_odds_mean``)."""
    df = normalize_table(table, source="transfer_table")
    df = df[df["layer"] == ""]
    down = df[downstream_mask(df) & (df["metric"] == "probe_accuracy")]
    if down.empty:
        return pd.DataFrame(columns=["run", "epoch"])
    out = down.pivot_table(index=["run", "epoch"], columns="task", values="value",
                           aggfunc="mean", dropna=False)
    for metric, name in (("transfer_accuracy_mean", "mean"), ("transfer_log_odds_mean",
                                                              "log_odds")):
        agg = df[df["metric"] == metric].groupby(["run", "epoch"])["value"].mean()
        if len(agg):
            out[name] = agg
    out.columns.name = None
    runs = {r: i for i, r in enumerate(dict.fromkeys(df["run"]))}
    out = out.reset_index()
    out = out.assign(_r=out["run"].map(runs)).sort_values(["_r", "epoch"]).drop(columns="_r")
    return out.reset_index(drop=True)
