"""Tests of dtprobe.plotting on the synthetic two-run table of test_results."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from test_results import (  # noqa: E402
    PROBE_PEAKS,
    TASKS,
    cka_matrix,
    manifest,
    probe_accuracy,
    source_accuracy,
    synthetic_table,
)

from dtprobe import plotting  # noqa: E402
from dtprobe.errors import ConfigError  # noqa: E402
from dtprobe.results import Results  # noqa: E402

# every chart type, few panels: keeps rendering fast on shared CPUs
CHART_METRICS = {"source_accuracy", "probe_accuracy", "nc1", "mi_xt", "mi_ty", "cka_to_final"}


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch):
    def _no_show(*args, **kwargs):
        raise AssertionError("plotting must never call plt.show()")

    monkeypatch.setattr(plt, "show", _no_show)
    rc_before = dict(matplotlib.rcParams)
    yield
    plt.close("all")
    assert dict(matplotlib.rcParams) == rc_before, "plotting changed global rcParams"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_table()


def _legend_labels(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def _colorbar_labels(fig: Figure) -> list[str]:
    return [a.get_ylabel() for a in fig.axes]


# ---------------------------------------------------------------------------- trade-off
def test_plot_tradeoff_draws_one_trajectory_per_run(table):
    fig, ax = plt.subplots()
    out = plotting.plot_tradeoff(table, ax=ax)
    assert out is ax
    assert "epoch" in _colorbar_labels(fig)
    assert _legend_labels(ax) == ["ce", "ctc", "first epoch", "last epoch"]
    assert len(ax.get_lines()) == 2
    ce_line = ax.get_lines()[0]
    x, y = ce_line.get_data()
    np.testing.assert_allclose(x, [source_accuracy("ce", e) for e in range(1, 17)])
    mean_probe = [np.mean([probe_accuracy("ce", t, e) for t in TASKS]) for e in range(1, 17)]
    np.testing.assert_allclose(y, mean_probe)
    assert "mean of 4 tasks" in ax.get_ylabel()
    assert ax.get_title() == "Discriminability vs transferability"


def test_plot_tradeoff_single_task_and_results_input(table):
    res = Results(table)
    ax = res.plot_tradeoff(task="colour")
    assert isinstance(ax, Axes)
    _, y = ax.get_lines()[1].get_data()
    np.testing.assert_allclose(y, [probe_accuracy("ctc", "colour", e) for e in range(1, 17)])
    assert "[colour]" in ax.get_ylabel()


def test_plot_tradeoff_other_metrics_and_errors(table):
    ax = plotting.plot_tradeoff(table, x="class_separation", y="logme")
    assert "class separation" in ax.get_xlabel() and "LogME" in ax.get_ylabel()
    with pytest.raises(ConfigError, match="needs metric 'probe_accuracy'"):
        plotting.plot_tradeoff(synthetic_table(metrics={"source_accuracy"}))
    with pytest.raises(ConfigError, match="available tasks: colour"):
        plotting.plot_tradeoff(table, task="texture")


def test_plot_tradeoff_by_task(table):
    fig = plotting.plot_tradeoff_by_task(table)
    titled = [a for a in fig.axes if a.get_title() in TASKS]
    assert sorted(a.get_title() for a in titled) == sorted(TASKS)
    assert "epoch" in _colorbar_labels(fig)


# ---------------------------------------------------------------------------- metrics
def test_plot_metrics_panels_and_lines(table):
    fig = plotting.plot_metrics(table, metrics=["source_accuracy", "probe_accuracy", "mi_xt"])
    assert isinstance(fig, Figure)
    panels = [a for a in fig.axes if a.get_title(loc="left")]
    titles = [a.get_title(loc="left") for a in panels]
    assert titles == ["source accuracy", "downstream probe accuracy", "I(X;T), renyi"]
    assert panels[0].get_ylabel() == "range [0, 1]"
    assert panels[2].get_ylabel() == "bits"
    assert len(panels[0].get_lines()) == 2            # one per run
    assert len(panels[1].get_lines()) == 2 * len(TASKS)  # run x task
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["ce", "ctc"] + [f"task: {t}" for t in TASKS]
    # every panel of the last row shows epoch labels
    assert panels[-1].get_xlabel() == "epoch"


def test_plot_metrics_default_uses_every_metric(table):
    fig = plotting.plot_metrics(table)
    panels = [a for a in fig.axes if a.get_title(loc="left")]
    assert len(panels) == len(Results(table).metrics)


def test_plot_metrics_accepts_axes_and_subsets(table):
    fig, axes = plt.subplots(1, 2)
    out = plotting.plot_metrics(table, metrics=["nc1", "rankme"], ax=axes)
    assert out is fig
    assert axes[0].get_title(loc="left").startswith("NC1")
    single = plotting.plot_metrics(synthetic_table(metrics={"nc4"}))
    assert len([a for a in single.axes if a.get_title(loc="left")]) == 1
    with pytest.raises(ConfigError, match="needs 2 Axes"):
        plotting.plot_metrics(table, metrics=["nc1", "rankme"], ax=axes[0])
    with pytest.raises(ConfigError, match="not in the results table"):
        plotting.plot_metrics(table, metrics=["nope"])


def test_plot_metrics_one_panel_per_estimator():
    t = synthetic_table(metrics={"mi_xt"})
    t2 = t.assign(estimator="mine", value=t["value"] * 0.7, params='{"unit": "nats"}')
    fig = plotting.plot_metrics(pd.concat([t, t2]))
    titles = sorted(a.get_title(loc="left") for a in fig.axes if a.get_title(loc="left"))
    assert titles == ["I(X;T), mine", "I(X;T), renyi"]
    ylabels = sorted(a.get_ylabel() for a in fig.axes if a.get_title(loc="left"))
    assert ylabels == ["bits", "nats"]


# ---------------------------------------------------------------------------- information plane
def test_plot_information_plane(table):
    fig, ax = plt.subplots()
    assert plotting.plot_information_plane(table, ax=ax) is ax
    assert ax.get_xlabel().startswith("I(X;T)") and "renyi" in ax.get_xlabel()
    assert "bits" in ax.get_ylabel()
    assert any("kernel_width=8" in t.get_text() for t in ax.texts)
    assert "epoch" in _colorbar_labels(fig)
    mi = synthetic_table(metrics={"mi_xt", "mi_ty"})
    both = pd.concat([mi, mi.assign(estimator="mine")])
    with pytest.raises(ConfigError, match="pass estimator="):
        plotting.plot_information_plane(both)
    ax = plotting.plot_information_plane(both, estimator="mine")
    assert "mine" in ax.get_xlabel()
    with pytest.raises(ConfigError, match="needs metric 'mi_xt'"):
        plotting.plot_information_plane(synthetic_table(metrics={"nc1"}))


# ---------------------------------------------------------------------------- CKA
def test_plot_cka_heatmap():
    fig, ax = plt.subplots()
    assert plotting.plot_cka(cka_matrix(), ax=ax) is ax
    im = ax.get_images()[0]
    assert im.get_clim() == (0.0, 1.0)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    epochs = [str(e) for e in cka_matrix().columns]
    assert set(labels) <= set(epochs) and len(labels) <= 9  # on checkpoint epochs only
    assert labels[0] == epochs[0] and labels[-1] == epochs[-1]  # the last epoch is labelled
    assert "linear CKA" in _colorbar_labels(fig)
    big = cka_matrix(n=150)
    ax2 = plotting.plot_cka(big)
    assert len(ax2.get_xticklabels()) <= 9
    assert ax2.get_xticklabels()[-1].get_text() == str(big.columns[-1])
    with pytest.raises(ConfigError):
        plotting.plot_cka(pd.DataFrame())


def test_plot_cka_grid_and_results_method(table):
    res = Results(table, cka={"ce": cka_matrix(), "ctc": cka_matrix(scale=3.0)})
    fig = res.plot_cka()
    assert isinstance(fig, Figure)
    assert sorted(a.get_title() for a in fig.axes if a.get_images()) == ["ce", "ctc"]
    ax = res.plot_cka("ctc")
    assert isinstance(ax, Axes) and "ctc" in ax.get_title()
    with pytest.raises(ConfigError, match="no temporal CKA matrix for run 'x'"):
        res.plot_cka("x")


def test_plot_cka_to_final_layers_and_runs(table):
    ax = plotting.plot_cka_to_final(table)
    labels = _legend_labels(ax)
    assert labels[:5] == ["layer1", "layer2", "layer3", "layer4", "penultimate"]
    assert labels[5:] == ["run: ce", "run: ctc"]
    assert len(ax.get_lines()) == 2 * 5
    penult = synthetic_table(metrics={"cka_to_final"})
    penult = penult[penult["layer"] == ""]
    fig, ax = plt.subplots()
    assert plotting.plot_cka_to_final(penult, ax=ax) is ax
    assert _legend_labels(ax) == ["ce", "ctc"]
    _, y = ax.get_lines()[0].get_data()
    assert y[-1] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- over epochs
def test_plot_tradeoff_over_epochs_marks_probe_peaks(table):
    one = table[table["run"] == "ce"]
    fig, ax = plt.subplots()
    assert plotting.plot_tradeoff_over_epochs(one, ax=ax) is ax
    peaks = sorted(int(line.get_xdata()[0]) for line in ax.get_lines()
                   if line.get_marker() == "v")
    assert peaks == sorted(p for _, p in PROBE_PEAKS["ce"].values())
    assert "(ce)" in ax.get_title()
    labels = _legend_labels(ax)
    assert labels[0].startswith("source accuracy") and "probe: colour" in labels
    both = plotting.plot_tradeoff_over_epochs(table)
    assert "run: ctc" in _legend_labels(both)
    only_source = plotting.plot_tradeoff_over_epochs(synthetic_table(metrics={"source_accuracy"}))
    assert len(only_source.get_lines()) == 2
    with pytest.raises(ConfigError):
        plotting.plot_tradeoff_over_epochs(synthetic_table(metrics={"nc1"}))


# ---------------------------------------------------------------------------- saving
def test_save_all_figures_writes_every_available_chart(tmp_path):
    res = Results(synthetic_table(metrics=CHART_METRICS),
                  manifests={"ce": manifest("ce")}, cka={"ce": cka_matrix()})
    before = plt.get_fignums()
    paths = res.save_figures(tmp_path / "figs")
    names = sorted({p.stem for p in paths})
    assert names == ["cka_to_final", "information_plane", "metrics", "temporal_cka", "tradeoff",
                     "tradeoff_plane", "tradeoff_plane_by_task"]
    assert len(paths) == 7
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert plt.get_fignums() == before  # figures closed after saving
    from PIL import Image

    with Image.open(tmp_path / "figs" / "tradeoff.png") as im:
        assert im.size[0] > 600 and im.size[1] > 500


def test_save_all_figures_skips_missing_metrics(tmp_path):
    paths = plotting.save_all_figures(synthetic_table(metrics={"nc1", "rankme"}), tmp_path,
                                      formats=("png", ".SVG"))
    assert [p.name for p in paths] == ["metrics.png", "metrics.svg"]
    assert b"<svg" in paths[1].read_bytes()[:1000]
    paths = plotting.save_all_figures(synthetic_table(metrics={"source_accuracy"}), tmp_path / "s")
    assert sorted(p.name for p in paths) == ["metrics.png", "tradeoff.png"]
    with pytest.raises(ConfigError, match="unsupported figure format"):
        plotting.save_all_figures(synthetic_table(metrics={"nc1"}), tmp_path, formats=("docx",))


def test_palette_is_stable():
    assert plotting.run_colors(["a", "b"])["a"] == plotting.run_colors(["a", "c"])["a"]
    assert set(plotting.task_colors(["x"]).values()).isdisjoint(
        plotting.run_colors(["a", "b"]).values())
