"""TensorBoard export: every finite row of the table becomes a scalar at its step/epoch."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dtprobe.results import Results
from dtprobe.results.export import export_tensorboard, scalar_tag

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard not installed (pip install 'dtprobe[tensorboard]')")


def _results(with_steps: bool = True) -> Results:
    rows = []
    for epoch, step in [(0, 0), (2, 100), (4, 200)]:
        rows.append(dict(run="ce", epoch=epoch, step=step if with_steps else "",
                         metric="source_accuracy", task="", layer="", value=0.1 + epoch / 10,
                         estimator="top1", params="{}"))
        rows.append(dict(run="ce", epoch=epoch, step=step if with_steps else "",
                         metric="probe_accuracy", task="colour", layer="",
                         value=math.nan if epoch == 2 else 0.9 - epoch / 10,
                         estimator="logreg-lbfgs", params="{}"))
    return Results(pd.DataFrame(rows))


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_export_writes_every_finite_row_at_its_step(tmp_path):
    n = export_tensorboard(_results(), tmp_path / "tb")
    assert n == 5  # one NaN probe row skipped
    got = _scalars(tmp_path / "tb")
    assert got[scalar_tag("source_accuracy")] == [
        (0, pytest.approx(0.1)), (100, pytest.approx(0.3)), (200, pytest.approx(0.5))]
    assert got["dtprobe/probe_accuracy/colour"] == [(0, pytest.approx(0.9)),
                                                    (200, pytest.approx(0.5))]


def test_export_falls_back_to_epochs_without_steps(tmp_path):
    export_tensorboard(_results(with_steps=False), tmp_path / "tb")
    got = _scalars(tmp_path / "tb")
    assert [s for s, _ in got["dtprobe/source_accuracy"]] == [0, 2, 4]
    from dtprobe.errors import ConfigError

    with pytest.raises(ConfigError, match="without a step"):
        export_tensorboard(_results(with_steps=False), tmp_path / "tb2", x="step")


def test_a_link_planted_at_the_event_file_name_is_replaced_not_written_through(tmp_path,
                                                                               monkeypatch):
    """TensorBoard names its event file from the time, host, pid and a counter: all
    predictable. Links planted at those names must be replaced, never written through."""
    import os
    import types

    from tensorboard.summary.writer import event_file_writer as efw

    monkeypatch.setattr(efw, "time", types.SimpleNamespace(time=lambda: 1_700_000_000))
    monkeypatch.setattr(efw.socket, "gethostname", lambda: "host")
    monkeypatch.setattr(efw, "_global_uid", efw.AtomicCounter(0))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tb = tmp_path / "tb"
    tb.mkdir()
    names = [f"events.out.tfevents.1700000000.host.{os.getpid()}.{uid}" for uid in range(4)]
    for name in names:
        (tb / name).symlink_to(victim)
    assert export_tensorboard(_results(), tb) == 5
    assert victim.read_text() == "precious"
    written = [p for p in tb.iterdir() if not p.is_symlink()]
    assert len(written) == 1 and written[0].name in names and written[0].stat().st_size > 0
    assert _scalars(tb)[scalar_tag("source_accuracy")][0] == (0, pytest.approx(0.1))


def test_run_names_never_lead_the_export_out_of_its_folder(tmp_path):
    res = _results()
    other = res.table.copy()
    other["run"] = "../../escaped"
    both = Results(pd.concat([res.table, other], ignore_index=True))
    export_tensorboard(both, tmp_path / "a" / "tb")
    assert not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in (tmp_path / "a" / "tb").iterdir()) == [".._.._escaped", "ce"]
