"""Tests of dtprobe.results.report: one self-contained HTML file that renders in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from test_plotting import CHART_METRICS  # noqa: E402
from test_results import cka_matrix, manifest, synthetic_table  # noqa: E402

from dtprobe.errors import ConfigError  # noqa: E402
from dtprobe.results import Results  # noqa: E402
from dtprobe.results.report import render_report, write_report  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if key in a and tag != "img":
                self.urls.append(a[key])


@pytest.fixture(scope="module")
def results() -> Results:
    metrics = CHART_METRICS | {"class_separation", "nc2_etf_error"}
    return Results(synthetic_table(metrics=metrics),
                   manifests={r: manifest(r) for r in ("ce", "ctc")},
                   cka={"ce": cka_matrix(), "ctc": cka_matrix(scale=10.0)},
                   sources={"ce": "/runs/ce", "ctc": "/runs/ctc"})


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> Path:
    out = write_report(results, tmp_path_factory.mktemp("rep") / "sub" / "report.html")
    plt.close("all")
    return out


def test_report_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    p = _Collect()
    p.feed(text)
    assert "script" not in p.tags and "link" not in p.tags
    assert all(u.startswith("#") for u in p.urls), p.urls  # only in-page links
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)
    assert len(p.imgs) == 8  # 7 charts + the layer x epoch CKA heatmap (layer rows present)
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for section in ("findings", "runs", "charts", "summary", "estimators", "probe-peaks",
                    "chart-tradeoff", "chart-temporal_cka"):
        assert section in p.ids
    assert oct(report.stat().st_mode & 0o777) == "0o644"
    assert not list(report.parent.glob(".*.tmp"))


def test_report_contents(report):
    text = report.read_text(encoding="utf-8")
    # configs side by side, differing settings highlighted
    assert re.search(r'<tr class=diff><td class="key">training.objective</td><td>ce</td>'
                     r"<td>ctc</td></tr>", text)
    assert '<td class="key">training.lr</td><td>0.05</td><td>0.05</td>' in text
    assert "16 checkpoints, epochs 1\u201316" in text
    start = text.index('id="runs-diff"')
    diff = text[start:text.index("</details>", start)]
    assert "training.alpha" in diff and "training.objective" in diff
    assert "training.lr" not in diff and "run_name" not in diff
    # where the probes peaked: ce colour at epoch 4 (0.950), down to 0.710 at epoch 16
    assert re.search(r"<tr><td>ce</td><td>colour</td><td class=num>4</td><td class=num>0.950"
                     r"</td><td class=num>16</td><td class=num>0.710</td>", text)
    assert "the largest loss is <b>colour</b>, from 0.950 at epoch 4 to 0.710" in text
    # summary: first/best/last with epochs; nc1 best is the minimum
    assert re.search(r"NC1 within-class variability</td><td></td><td></td><td>ce</td><td>min</td>"
                     r'<td class=num>5.000 <span class="ep">@1</span></td>', text)
    # changes are coloured by direction: NC1 falling is an improvement, a probe falling a loss
    assert '<span class="pos">\u22124.688</span>' in text
    assert '<span class="neg">\u22120.240</span>' in text
    # estimator parameters are listed
    assert "alpha=1.01, kernel_width=8.0, n_samples=1000" in text
    assert "/runs/ce" in text


def test_report_layout_and_run_comparison(report):
    text = report.read_text(encoding="utf-8")
    # findings, then the run-vs-run comparison, then the charts; settings come after, collapsed
    order = [text.index(f'<section id="{s}">') for s in
             ("findings", "compare", "charts", "summary", "runs", "estimators")]
    assert order == sorted(order)
    runs = text[order[4]:order[5]]
    assert "<table" not in runs.split("<details", 1)[0]  # every settings table is collapsed
    assert "<details open" not in runs
    compare = text[order[1]:order[2]]
    assert "<b>ctc</b>" in compare and "<b>ce</b>" in compare and "last (other)" in compare
    assert re.search(r"last epoch: (no difference beyond the intervals|\S+ is (above|below) "
                     r"\S+ beyond the intervals on \d of \d tasks|\d tasks without an "
                     r"interval)", compare)
    # floats print with a few digits, never a 16-digit repr
    assert not re.search(r"\d\.\d{7,}", text.split("<section id=\"charts\">")[0]
                         + text.split("<section id=\"summary\">")[1].replace("base64", ""))


def test_settings_print_with_few_digits():
    from dtprobe.results.report import _setting_text

    assert _setting_text(0.0031622776601683794) == "0.003162"
    assert _setting_text([0.001, 0.0031622776601683794, 10.0]) == "[0.001, 0.003162, 10.0]"
    assert _setting_text(1e-12) == "1e-12" and _setting_text("scott") == "scott"
    grid = {"c_grid": [float(c) for c in __import__("numpy").logspace(-6, 5, 45)]}
    t = synthetic_table(metrics={"probe_accuracy"})
    t["params"] = json.dumps(grid)
    text = render_report(Results(t))
    assert "0.0031622776601683794" not in text and "3.162e-06" in text


def test_cka_to_other_run_is_never_called_best(tmp_path):
    rows = [{"run": "ce", "epoch": e, "metric": "cka_to_run", "other_run": "ctc", "value": v}
            for e, v in [(0, 1.0), (2, 0.7), (4, 0.5)]]
    text = render_report(Results(pd.DataFrame(rows)))
    row = text[text.index("linear CKA to other run</td>"):]
    row = row[:row.index("</tr>")]
    assert "vs ctc" in row and "@0" in row  # first value at epoch 0 ...
    assert row.count("@") == 2 and "a similarity has no best" in row  # ... but no best


def test_report_with_missing_parts(tmp_path):
    out = write_report(Results(synthetic_table(metrics={"nc1"})), tmp_path / "r.html",
                       title="Only <NC1>")
    text = out.read_text(encoding="utf-8")
    assert "<title>Only &lt;NC1&gt;</title>" in text
    assert "No run manifests were found" in text
    assert "No downstream probe accuracy" in text
    assert text.count("<img") == 1  # the metrics chart
    assert "could not be analysed" not in text
    failed = Results(synthetic_table(metrics={"nc1"}),
                     failures=pd.DataFrame([{"run": "ce", "epoch": 3, "path": "e3.pt",
                                             "reason": "truncated <file>"}]))
    page = render_report(failed)
    assert "1 checkpoint could not be analysed" in page and "truncated &lt;file&gt;" in page
    empty = render_report(Results(synthetic_table(metrics={"nc1"}).iloc[:0]))
    assert "No chart can be drawn" in empty
    with pytest.raises(ConfigError, match="needs a Results object"):
        write_report("not results", tmp_path / "x.html")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not found; install it (`apt-get install -y chromium`) to run this "
                    "browser rendering test")
    # a copy of the report with a probe script that records whether every image decoded
    probe = ("<script>window.addEventListener('load', function () {"
             "var r = Array.from(document.images).map(function (i) {"
             "return {ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}; });"
             "var p = document.createElement('pre'); p.id = 'imgcheck';"
             "p.textContent = JSON.stringify(r); document.body.appendChild(p); });</script>")
    page = tmp_path / "probe.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe + "</body>"),
                    encoding="utf-8")
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom.stdout, re.S)
    assert found, "probe script did not run: " + dom.stdout[-500:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == 8 and all(i["ok"] and i["w"] > 300 for i in images), images

    shot = tmp_path / "shot.png"
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000",
                          report.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image, ImageStat

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.stddev[0] > 20  # text, tables and charts, not a blank page
