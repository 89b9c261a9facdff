"""Results of an analysis: the results object, its uncertainty, the HTML report, exports.

- :mod:`~dtprobe.results.core`: :class:`Results` (the tidy table, CKA matrices, failures),
  :func:`load_results`, :func:`compare`, rank correlations;
- :mod:`~dtprobe.results.uncertainty`: intervals, run differences, chance levels;
- :mod:`~dtprobe.results.report`: the self-contained HTML report;
- :mod:`~dtprobe.results.export`: TensorBoard export.

Import order: :mod:`dtprobe.table` <- core, uncertainty <- report. ``Results.plot_*`` and
``Results.write_report`` import :mod:`dtprobe.plotting` / the report on call (matplotlib only
when a chart is drawn). This package re-exports the names ``dtprobe.results`` (formerly one
module) had.
"""

from __future__ import annotations

from dtprobe.results.core import (
    ANALYSIS_DIR,
    CKA_FILE,
    FAILURE_COLUMNS,
    FAILURES_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    RANKED_SCORES,
    Results,
    compare,
    kendall_tau,
    load_results,
    protocol_peaks,
    read_cka_matrix,
    score_rank_correlation,
    transfer_table,
)
from dtprobe.table import (
    COLUMN_DOCS,
    DIAGNOSTIC_KEYS,
    DOWNSTREAM_PARAM,
    METRIC_INFO,
    METRIC_ORDER,
    TABLE_COLUMNS,
    MetricInfo,
    downstream_mask,
    downstream_tasks,
    estimator_settings,
    estimator_unit,
    metric_info,
    natural_key,
    normalize_table,
    parse_params,
    sort_layers,
    sort_metrics,
    split_params,
)

__all__ = [
    "ANALYSIS_DIR",
    "CKA_FILE",
    "COLUMN_DOCS",
    "DIAGNOSTIC_KEYS",
    "DOWNSTREAM_PARAM",
    "FAILURES_FILE",
    "FAILURE_COLUMNS",
    "MANIFEST_FILE",
    "METRICS_FILE",
    "METRIC_INFO",
    "METRIC_ORDER",
    "RANKED_SCORES",
    "TABLE_COLUMNS",
    "MetricInfo",
    "Results",
    "compare",
    "downstream_mask",
    "downstream_tasks",
    "estimator_settings",
    "estimator_unit",
    "kendall_tau",
    "load_results",
    "metric_info",
    "natural_key",
    "normalize_table",
    "parse_params",
    "read_cka_matrix",
    "protocol_peaks",
    "score_rank_correlation",
    "sort_layers",
    "sort_metrics",
    "split_params",
    "transfer_table",
]
