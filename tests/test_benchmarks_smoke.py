"""Smoke tests of the benchmark suite (``python -m benchmarks.run --quick``).

The in-process benchmarks run at their quick sizes and must produce well-formed rows whose
dtprobe and baseline outputs agree; timings are never asserted. The subprocess benchmarks
(``memory``, ``training``) and the whole CLI run are slow (each spawns Python + torch) and
are marked ``slow``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not installed; it lives next to ``tests``
    sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
from benchmarks import Row, markdown_table  # noqa: E402
from benchmarks import cka as cka_bench  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from benchmarks import separation as sep_bench  # noqa: E402
from dtprobe.metrics.cka import linear_cka  # noqa: E402
from dtprobe.metrics.separation import class_separation  # noqa: E402


def _check_rows(rows: list[Row]) -> None:
    assert rows
    for row in rows:
        assert row.agree_ok, f"{row.name}: {row.agreement}"
        if row.skipped:
            assert row.note.startswith("skipped")
            continue
        assert row.ours is not None and row.ours > 0 and math.isfinite(row.ours)
        assert row.base is not None and row.base > 0 and math.isfinite(row.base)
        assert row.ratio is not None and row.ratio > 0
        assert row.met in (True, False, None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_implementations_match_dtprobe_on_small_inputs():
    x, y = sep_bench.make_features(300, 16, 4, seed=2)
    assert sep_bench.pairwise_class_separation(x, y, block=64) == pytest.approx(
        class_separation(x, y), abs=1e-12)
    a, b = cka_bench.make_epochs(2, 120, 8, seed=3)
    assert cka_bench._gram_cka_formula(a, b) == pytest.approx(linear_cka(a, b), abs=1e-10)
    assert cka_bench._unbiased_cka_formula(a, b) == pytest.approx(
        linear_cka(a, b, debiased=True), abs=1e-5)  # float32, as torch-cka computes it


@pytest.mark.parametrize("name", ["separation", "cka", "probe", "extraction",
                                  "gpu_extraction", "feature_dtype", "onnx_engine"])
def test_quick_in_process_benchmarks_agree(name):
    rows = bench_run.run_all([name], quick=True, log=lambda _m: None)
    _check_rows(rows)
    if name == "gpu_extraction" and not torch.cuda.is_available():
        assert rows[0].skipped and rows[0].met is None


def test_gpu_rows_refuses_without_cuda_and_runs_quick_on_cpu(capsys):
    from benchmarks import gpu_rows

    if not torch.cuda.is_available():
        assert gpu_rows.main([]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device; this script measures GPU rows" in err[0]
        with pytest.raises(RuntimeError, match="no CUDA device"):
            gpu_rows.run(quick=False)
    rows = gpu_rows.run(quick=True, log=lambda _m: None)
    assert [r.kind for r in rows] == ["rate", "speedup", "speedup"]
    assert all(r.agree_ok for r in rows), [r.agreement for r in rows]
    assert rows[0].ratio > 0 and rows[2].ratio > 0 and rows[1].ours > 0
    assert "n used on both devices: 600" in rows[2].note
    assert "| linear probe, " in markdown_table(rows)


def test_row_ratios_goals_and_table():
    fast = Row(name="a", sizes="n=1", ours=0.5, base=10.0, goal=5, agreement="ok")
    assert fast.ratio == pytest.approx(20.0) and fast.met is True
    slow = Row(name="b", sizes="n=1", ours=4.0, base=10.0, goal=5, agreement="ok")
    assert slow.met is False
    flat = Row(name="c", sizes="n=1", ours=1050.0, base=1000.0, unit="MB", kind="factor",
               goal=1.1)
    assert flat.ratio == pytest.approx(1.05) and flat.met is True
    rate = Row(name="d", sizes="n=1", ours=80.0, base=100.0, unit="img/s", kind="rate",
               goal=0.85)
    assert rate.ratio == pytest.approx(0.8) and rate.met is False
    report = Row(name="e", sizes="n=1", ours=2.0, base=1.0, kind="factor", goal=None)
    assert report.met is None
    bad = Row(name="f", sizes="n=1", ours=1.0, base=1.0, agreement="x", agree_ok=False,
              note="something")
    table = markdown_table([fast, slow, flat, rate, report, bad])
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | sizes | dtprobe | baseline | ratio | goal |")
    assert all(line.count("|") == 9 for line in lines[2:8])  # no stray pipes in cells
    assert "20.0x" in table and "80%" in table and "**no**" in table
    assert "DISAGREE" in table and "- f: something" in table
    assert json.dumps(fast.to_dict())  # serialisable, with ratio and met


def test_cli_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_run.main(["--threads", "0"])
    with pytest.raises(SystemExit):
        bench_run.main(["--only", "nonexistent"])
    assert "CPU cores" in bench_run.machine() and benchmarks.cpu_model()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["memory", "training", "live", "downstream"])
def test_quick_subprocess_benchmarks_agree(name):
    _check_rows(bench_run.run_all([name], quick=True, log=lambda _m: None))


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = bench_run.main(["--quick", "--threads", "1", "--json", str(out), "--only",
                           "separation", "cka", "memory"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["quick"] and len(doc["rows"]) == 4
    assert "| benchmark |" in capsys.readouterr().out
