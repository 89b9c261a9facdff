"""Everything dtprobe writes goes through the one atomic writer (issue 25, part 2).

A symbolic link planted at the name of a file dtprobe writes must be replaced, never written
through: the TensorBoard event files (``tests/test_export.py``), the sweep's index, tables and
charts, and the ONNX engine, whose runtime library writes files of its own when imported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _plant(path: Path, victim: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim)


def test_sweep_index_tables_and_charts_replace_planted_links(tmp_path):
    from dtprobe.training import sweep

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "sweep"
    for name in (sweep.SWEEP_FILE, f".{sweep.SWEEP_FILE}.tmp", "figures/objectives_accuracy.png",
                 "figures/objectives_separation.png"):
        _plant(out / name, victim)
    sweep._write_index(out, [{"objective": "ce", "seed": 0, "dir": "ce-s0", "status": "ok"}])
    summary = pd.DataFrame({"objective": ["ce", "smooth"], "seeds": [1, 1], "diverged": [0, 0],
                            "source_accuracy": [0.9, 0.8], "source_accuracy_std": [0, 0],
                            "class_separation": [0.5, 0.6], "class_separation_std": [0, 0],
                            "transfer": [0.7, 0.6], "transfer_std": [0, 0]})
    written = sweep.plot_sweep(summary, out / "figures")
    assert victim.read_text() == "precious"
    assert sweep.read_sweep(out)[0]["objective"] == "ce"
    for path in [out / sweep.SWEEP_FILE, *written]:
        assert not path.is_symlink() and path.stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime not installed (pip install 'dtprobe[onnx]')")
def test_onnx_engine_writes_nothing_outside_and_never_through_a_planted_link(tmp_path):
    """ONNX Runtime's telemetry writes ``$TMPDIR/.ses`` (O_CREAT|O_TRUNC, links followed) on
    import; the export and the session must write no file at all (Python audit events)."""
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    tmp.mkdir()
    home.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp / ".ses").symlink_to(victim)
    script = textwrap.dedent("""
        import os, sys
        import torch
        from dtprobe.features.extract import extract_features
        from dtprobe.features.engines import onnx as eng
        from dtprobe.models import build_model

        writes = []
        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                        isinstance(flags, int)
                        and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                    writes.append(str(path))
        model = build_model("small_cnn", 4, width=8, feature_dim=16).eval()
        sys.addaudithook(hook)
        eng.require_onnxruntime()
        extract_features(model, model.fc, torch.randn(9, 3, 16, 16), device="cpu",
                         batch_size=4, engine="onnx")
        assert eng.export_stats()["exports"] == 1, eng.export_stats()
        print([w for w in writes if w != os.devnull])
    """)
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp), HOME=str(home))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert victim.read_text() == "precious"
    assert not list(home.rglob("*"))  # no telemetry database in the home folder either
