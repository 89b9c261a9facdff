"""Quick run of benchmarks/diagnostics.py: every new metric agrees with its naive implementation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not installed; it lives next to ``tests``
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from benchmarks import diagnostics  # noqa: E402


@pytest.mark.slow  # ~15-50 s on the shared 2-core machine (dense naive baselines, sklearn EM)
def test_quick_rows_agree():
    rows = diagnostics.run(quick=True)
    assert len(rows) == 13
    for row in rows:
        assert row.agree_ok, f"{row.name}: {row.agreement}"
        assert row.ours > 0 and row.base > 0 and math.isfinite(row.ratio)
