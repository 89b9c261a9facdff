"""A single self-contained HTML report of one or more analysed runs.

The report opens with the findings (where each downstream probe peaked) and the run-vs-run
comparison (e.g. CTC against CE, task by task), embeds every chart that the available metrics
allow (PNG, base64 in the page), tabulates the first/best/last value of every metric, and ends
with the run configurations (collapsed) and the estimators' settings. It needs no network and no
other file: CSS is inline and there is no JavaScript, so it can be mailed or archived as is.

The layout follows the question of Kornblith et al. (2021) and Cui et al. (2022): while
source accuracy (discriminability) rises, when does transferability (downstream linear-probe
accuracy) peak, and how much is lost by the end of training?
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import checkpoints_manifest as cm
from dtprobe import __version__
from dtprobe.errors import ConfigError
from dtprobe.references import with_references
from dtprobe.table import metric_info, parse_params

__doc__ = with_references(__doc__, "kornblith2021", "cui2022")

if TYPE_CHECKING:  # pragma: no cover  (type only: the report never imports dtprobe.results.core)
    from dtprobe.results.core import Results

_CSS = """
:root { --fg: #1d2327; --muted: #5b6670; --line: #d9dee3; --head: #f3f5f7; --accent: #0173b2;
        --diff: #fff4d6; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial,
       sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 40px 0 12px; padding-bottom: 6px; border-bottom: 2px solid
     var(--line); }
h3 { font-size: 16px; margin: 24px 0 8px; }
p.meta, p.note, figcaption { color: var(--muted); }
p.meta { margin: 0 0 16px; font-size: 14px; }
nav { display: flex; flex-wrap: wrap; gap: 6px 18px; font-size: 14px; margin-bottom: 8px; }
nav a, a { color: var(--accent); text-decoration: none; }
ul.findings { padding-left: 20px; }
ul.findings li { margin: 4px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; margin: 8px 0 16px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
tr.diff td { background: var(--diff); }
tbody tr:nth-child(even):not(.diff) td { background: #fafbfc; }
figure { margin: 18px 0 30px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; }
figcaption { font-size: 14px; margin-top: 6px; }
.ep { color: var(--muted); font-size: 12px; }
.neg { color: #b54708; }
.pos { color: #1a7f37; }
details { margin: 8px 0 16px; }
summary { cursor: pointer; color: var(--accent); font-size: 14px; margin-bottom: 6px; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x: Any) -> str:
    """Format a number for a table: 3 decimals below 10, 1 below 10^4, else scientific."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _esc(x)
    if not math.isfinite(v):
        return "&ndash;"
    a = abs(v)
    if a == 0:
        text = "0"
    elif a >= 1e4 or a < 1e-3:
        text = f"{a:.2e}"
    elif a >= 10:
        text = f"{a:.1f}"
    else:
        text = f"{a:.3f}"
    return ("\u2212" if v < 0 else "") + text


def _signed(x: float, higher_is_better: bool = True) -> str:
    """Signed number, green when the change is an improvement and orange when it is a loss."""
    if not math.isfinite(x):
        return "&ndash;"
    good = (x > 0) == higher_is_better
    cls = "" if x == 0 else "pos" if good else "neg"
    text = ("+" if x > 0 else "") + _fmt(x)
    return f'<span class="{cls}">{text}</span>' if cls else text


def _short(value: Any) -> Any:
    """Floats to 4 significant digits (recursively), so settings print as 0.00316, not 16 digits."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else value
    if isinstance(value, (list, tuple)):
        return [_short(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _short(v) for k, v in value.items()}
    return value


def _setting_text(value: Any) -> str:
    """A setting's value for display: short floats, JSON for lists, plain text otherwise."""
    value = _short(value)
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{value:.1f}"
    text = json.dumps(value, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        if not value and prefix:
            out[prefix] = "{}"
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif prefix.split(".")[-1] == "checkpoints" and isinstance(value, list):
        epochs = [c.get("epoch") for c in value if isinstance(c, Mapping)
                  and isinstance(c.get("epoch"), (int, float))]
        span = f", epochs {min(epochs)}\u2013{max(epochs)}" if epochs else ""
        out[prefix] = f"{len(value)} checkpoint{'s' if len(value) != 1 else ''}{span}"
    elif isinstance(value, (list, tuple, float)):
        out[prefix] = _setting_text(value)
    elif value is None:
        out[prefix] = ""
    else:
        out[prefix] = str(value)


def _config_table(results: Results) -> str:
    runs = [r for r in results.runs if results.manifests.get(r)]
    if not runs:
        return ('<p class="note">No run manifests were found (<code>RUN_DIR/manifest.json</code>),'
                ' so run configurations cannot be shown.</p>')
    flat: dict[str, dict[str, str]] = {}
    for run in runs:
        values: dict[str, str] = {}
        _flatten("", results.manifests[run], values)
        flat[run] = values
    keys: list[str] = []
    for run in runs:
        for k in flat[run]:
            if k in keys:
                continue
            # keep a later run's extra setting next to its siblings (same top-level section)
            top = k.split(".")[0]
            same = [i for i, old in enumerate(keys) if old.split(".")[0] == top]
            keys.insert(same[-1] + 1 if same else len(keys), k)
    head = "".join(f"<th>{_esc(r)}</th>" for r in runs)
    rows, diff_rows = [], []
    ignore = {"created", "run_name"}  # differ between any two runs by construction
    for key in keys:
        vals = [flat[r].get(key, "") for r in runs]
        diff = len(runs) > 1 and len(set(vals)) > 1
        cells = "".join(f"<td>{_esc(v) if v else '&ndash;'}</td>" for v in vals)
        row = (f'<tr{" class=diff" if diff else ""}><td class="key">{_esc(key)}</td>'
               f"{cells}</tr>")
        rows.append(row)
        if diff and key.split(".")[-1] not in ignore:
            diff_rows.append(row)

    def table(body: list[str]) -> str:
        return (f'<div class="scroll"><table><thead><tr><th>setting</th>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>')

    full = (f"<details><summary>All {len(keys)} recorded settings"
            f"{' (differences highlighted)' if len(runs) > 1 else ''}</summary>"
            f"{table(rows)}</details>")
    if len(runs) == 1:
        return full
    if not diff_rows:
        return ('<p class="note">The runs share every recorded setting (apart from name and '
                f"creation time).</p>{full}")
    return (f'<details id="runs-diff"><summary>{len(diff_rows)} settings differ between '
            f"runs</summary>{table(diff_rows)}</details>{full}")


def _findings(results: Results) -> str:
    peaks = results.probe_peaks()
    items = []
    for run in results.runs:
        p = peaks[peaks["run"] == run]
        if p.empty:
            continue
        src = p["source_last"].iloc[0]
        early = p[p["peak_epoch"] < p["last_epoch"]]
        txt = (f"<b>{_esc(run)}</b>: {len(early)} of {len(p)} downstream probe"
               f"{'s' if len(p) != 1 else ''} peaked before the last epoch "
               f"({p['last_epoch'].max()})")
        if len(early):
            worst = early.sort_values("drop", ascending=False).iloc[0]
            txt += (f"; the largest loss is <b>{_esc(worst['task'])}</b>, from "
                    f"{_fmt(worst['peak'])} at epoch {int(worst['peak_epoch'])} to "
                    f"{_fmt(worst['last'])} ({_signed(-float(worst['drop']))})")
        if math.isfinite(src):
            txt += f", while source accuracy ended at {_fmt(src)}"
        items.append(f"<li>{txt}.</li>")
    if not items:
        return ('<p class="note">No downstream probe accuracy in the table; run '
                '<code>dtprobe analyze</code> with the <code>probe_accuracy</code> metric to see '
                'where transferability peaks.</p>')
    head = ("<tr><th>run</th><th>task</th><th>peak epoch</th><th>peak</th><th>last epoch</th>"
            "<th>last</th><th>change after peak</th><th>source acc. at peak</th>"
            "<th>source acc. at last</th></tr>")
    rows = "".join(
        f"<tr><td>{_esc(r.run)}</td><td>{_esc(r.task)}</td><td class=num>{int(r.peak_epoch)}</td>"
        f"<td class=num>{_fmt(r.peak)}</td><td class=num>{int(r.last_epoch)}</td>"
        f"<td class=num>{_fmt(r.last)}</td><td class=num>{_signed(-float(r.drop))}</td>"
        f"<td class=num>{_fmt(r.source_at_peak)}</td><td class=num>{_fmt(r.source_last)}</td>"
        f"</tr>" for r in peaks.sort_values(["task", "run"], kind="stable").itertuples())
    return (f'<ul class="findings">{"".join(items)}</ul>'
            f'<h3 id="probe-peaks">Where each downstream probe peaked</h3>'
            f'<div class="scroll"><table><thead>{head}</thead><tbody>{rows}</tbody></table></div>')


def _uncertainty(results: Results) -> str:
    """Which run differences exceed their intervals; which CKA scores do not exceed chance."""
    from dtprobe.results.uncertainty import chance_level, intervals, run_differences

    table = results.table
    parts = []
    diffs = run_differences(table)
    if intervals(table).empty:
        parts.append('<p class="note">No row of the table carries a confidence interval '
                     '(<code>ci_low</code>/<code>ci_high</code> in its params).</p>')
    elif diffs.empty:
        parts.append('<p class="note">Intervals exist for one run only; compare runs to see '
                     'which differences exceed them.</p>')
    else:
        rows = []
        for (metric, task, layer), g in diffs.groupby(["metric", "task", "layer"], sort=False):
            for (ra, rb), h in g.groupby(["run_a", "run_b"], sort=False):
                hit = h[h["exceeds"]]
                last = h.sort_values("epoch").iloc[-1]
                rows.append(
                    f"<tr><td>{_esc(metric_info(metric).label)}</td><td>{_esc(task)}</td>"
                    f"<td>{_esc(layer)}</td><td>{_esc(ra)} vs {_esc(rb)}</td>"
                    f"<td class=num>{len(hit)} of {len(h)}</td>"
                    f"<td>{_esc(', '.join(str(int(e)) for e in hit['epoch'])) or '-'}</td>"
                    f"<td class=num>{_fmt(last.value_a)} [{_fmt(last.low_a)}, {_fmt(last.high_a)}]"
                    f" vs {_fmt(last.value_b)} [{_fmt(last.low_b)}, {_fmt(last.high_b)}]"
                    f' <span class="ep">@{int(last.epoch)}</span></td></tr>')
        parts.append('<p class="note">A difference counts when its 95% interval, built from '
                     'the two runs\' intervals by Newcombe\'s method, excludes 0 (conservative '
                     'for probes scored on the same test images). Charts draw the intervals as '
                     'bands.</p>'
                     '<div class="scroll"><table><thead><tr><th>metric</th><th>task</th>'
                     '<th>layer</th><th>runs</th><th>epochs beyond the intervals</th>'
                     '<th>which epochs</th><th>last epoch: value [interval]</th></tr></thead>'
                     f'<tbody>{"".join(rows)}</tbody></table></div>')
    null = chance_level(table)
    if not null.empty:
        null = null[null["layer"] == ""]
        below = null[null["value"] <= null["high"]]
        parts.append(
            '<p class="note">CKA rows carry a permutation null (rows of one side shuffled): '
            f"{len(below)} of {len(null)} penultimate-layer CKA values are at or below the 95% "
            "quantile of chance"
            + (": " + _esc(", ".join(f"{m} {r}@{int(e)}" for m, r, e in
                                     below[["metric", "run", "epoch"]].head(12).itertuples(
                                         index=False, name=None))) if len(below) else "")
            + ". With few test samples relative to the width prefer debiased CKA "
            "(<code>--metrics debiased_cka</code>).</p>")
    return "".join(parts)


def _summary_table(results: Results) -> str:
    s = results.summary()
    if s.empty:
        return '<p class="note">The results table holds no finite values.</p>'
    order = {r: i for i, r in enumerate(results.runs)}
    s = s.assign(_r=s["run"].map(order))
    s = s.sort_values(["task", "layer", "estimator", "_r"], kind="stable")
    s = s.sort_values("metric", key=lambda m: m.map(
        {name: i for i, name in enumerate(dict.fromkeys(results.metrics))}), kind="stable")
    head = ("<tr><th>metric</th><th>task</th><th>layer</th><th>run</th><th>best is</th>"
            "<th>first</th><th>best</th><th>last</th><th>last &minus; first</th></tr>")
    rows = []
    for r in s.itertuples():
        label = metric_info(r.metric).label
        est = f' <span class="ep">({_esc(r.estimator)})</span>' if r.estimator else ""
        task = r.task or (f"vs {r.other_run}" if r.other_run else "")
        # a similarity (CKA) has no best: its maximum is the reference epoch or a shared start
        best = (f'<td class=num>{_fmt(r.best)} <span class="ep">@{int(r.best_epoch)}</span></td>'
                if r.best_is else '<td class=num title="a similarity has no best">&ndash;</td>')
        rows.append(
            f'<tr><td title="{_esc(r.metric)}">{_esc(label)}{est}</td><td>{_esc(task)}</td>'
            f"<td>{_esc(r.layer)}</td><td>{_esc(r.run)}</td><td>{r.best_is or '&ndash;'}</td>"
            f'<td class=num>{_fmt(r.first)} <span class="ep">@{r.first_epoch}</span></td>'
            f"{best}"
            f'<td class=num>{_fmt(r.last)} <span class="ep">@{r.last_epoch}</span></td>'
            f"<td class=num>{_signed(float(r.change), r.best_is != 'min')}</td></tr>")
    return ('<p class="note">@N is the epoch. "best is" says whether the best value is the '
            'maximum or the minimum (neural-collapse distances shrink as features collapse); '
            'ties go to the earliest epoch. CKA similarities have no best: CKA to the final '
            'epoch peaks there by definition, and CKA to another run is highest at epoch 0 '
            'when both runs start from the same initialisation. The change is green when the '
            'metric moved towards its best direction and orange when it moved away.</p>'
            f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody>'
            "</table></div>")


def _estimator_table(results: Results) -> str:
    e = results.estimators()
    if e.empty:
        return '<p class="note">No estimator parameters were recorded.</p>'
    rows = []
    for r in e.itertuples():
        settings = parse_params(r.settings)
        text = ", ".join(f"{_esc(k)}={_esc(_setting_text(v))}" for k, v in settings.items())
        computed = ", ".join(x for x in (r.diagnostics, r.varying) if x)
        rows.append(f"<tr><td>{_esc(r.metric)}</td><td>{_esc(r.estimator) or '&ndash;'}</td>"
                    f"<td><code>{text or '&ndash;'}</code></td>"
                    f"<td><code>{_esc(computed) or '&ndash;'}</code></td></tr>")
    return ('<p class="note">Settings are the estimator\'s inputs, the same for every '
            'checkpoint. Values computed per checkpoint (a probe\'s selected regularisation, a '
            'data-driven kernel width, entropies, the chance level ...) are not settings: they '
            'are named in the last column and stored in the <code>diagnostics</code> column of '
            '<code>metrics.csv</code>.</p>'
            '<div class="scroll"><table><thead><tr><th>metric</th><th>estimator</th>'
            "<th>settings</th><th>computed per checkpoint</th></tr></thead>"
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _objective(results: Results, run: str) -> str:
    training = (results.manifests.get(run) or {}).get("training") or {}
    return str(training.get("objective", "")) if isinstance(training, Mapping) else ""


def _label(results: Results, run: str) -> str:
    obj = _objective(results, run)
    return f"<b>{_esc(run)}</b>" + (f" ({_esc(obj.upper())})" if obj and obj != run else "")


def _run_comparison(results: Results) -> str:
    """Run vs run: the other runs against the first CE run (or the first run), task by task."""
    from dtprobe.results.uncertainty import last_epoch_differences, verdict_sentence

    peaks = results.probe_peaks()
    runs = [r for r in results.runs if r in set(peaks["run"])]
    if len(runs) < 2:
        return ('<p class="note">One run only: analyse a second run (e.g. the same schedule '
                'with <code>dtprobe train --ctc</code>) and report both to compare them.</p>')
    base = next((r for r in runs if _objective(results, r) == "ce"), runs[0])
    cka = results.table[results.table["metric"] == "cka_to_run"]
    items, rows = [], []
    for other in (r for r in runs if r != base):
        b = peaks[peaks["run"] == base].set_index("task")
        o = peaks[peaks["run"] == other].set_index("task")
        tasks = [t for t in b.index if t in o.index]
        if not tasks:
            continue
        d_last = (o.loc[tasks, "last"] - b.loc[tasks, "last"]).astype(float)
        d_peak = (o.loc[tasks, "peak"] - b.loc[tasks, "peak"]).astype(float)
        src = float(o["source_last"].iloc[0]) - float(b["source_last"].iloc[0])
        judged = last_epoch_differences(results.table, base, other).set_index("task")
        judged = judged.reindex(tasks)
        judged["task"] = judged.index
        judged["verdict"] = judged["verdict"].fillna("no interval")
        verdict = verdict_sentence(judged, _esc(other), _esc(base), what="task")
        txt = (f"{_label(results, other)} vs {_label(results, base)}, last epoch: {verdict} "
               f"(mean difference {_signed(float(d_last.mean()))}, from "
               f"{_signed(float(d_last.min()))} to {_signed(float(d_last.max()))}); at "
               f"their peaks the mean difference is {_signed(float(d_peak.mean()))}")
        if math.isfinite(src):
            txt += f"; source accuracy differs by {_signed(src)} at the last epoch"
        pair = cka[((cka["run"] == base) & (cka["other_run"] == other))
                   | ((cka["run"] == other) & (cka["other_run"] == base))]
        if len(pair):
            last = pair.sort_values("epoch").iloc[-1]
            txt += (f"; their features have linear CKA {_fmt(last['value'])} at epoch "
                    f"{int(last['epoch'])}")
        items.append(f"<li>{txt}.</li>")
        for t in tasks:
            j = judged.loc[t]
            interval = ("" if j["verdict"] == "no interval" else
                        f" [{_signed(float(j['low']))}, {_signed(float(j['high']))}]")
            beyond = {"higher": "yes", "lower": "yes", "no difference": "no"}.get(
                j["verdict"], "not judged")
            rows.append(
                f"<tr><td>{_esc(other)} &minus; {_esc(base)}</td><td>{_esc(t)}</td>"
                f"<td class=num>{_fmt(b.loc[t, 'last'])}</td>"
                f"<td class=num>{_fmt(o.loc[t, 'last'])}</td>"
                f"<td class=num>{_signed(float(d_last[t]))}{interval}</td>"
                f"<td>{beyond}</td>"
                f"<td class=num>{_fmt(b.loc[t, 'peak'])} <span class=ep>@"
                f"{int(b.loc[t, 'peak_epoch'])}</span></td>"
                f"<td class=num>{_fmt(o.loc[t, 'peak'])} <span class=ep>@"
                f"{int(o.loc[t, 'peak_epoch'])}</span></td>"
                f"<td class=num>{_signed(float(d_peak[t]))}</td></tr>")
    if not items:
        return '<p class="note">The runs share no downstream task to compare.</p>'
    head = ("<tr><th>runs</th><th>task</th><th>last (first run)</th><th>last (other)</th>"
            "<th>difference [95% interval]</th><th>beyond the intervals</th>"
            "<th>peak (first run)</th><th>peak (other)</th><th>difference</th></tr>")
    return (f'<ul class="findings">{"".join(items)}</ul>'
            '<p class="note">Differences are other run minus the first (cross-entropy) run, '
            'downstream linear-probe test accuracy; green = the other run transfers better. '
            'A last-epoch difference counts only when its 95% interval (Newcombe\'s method '
            'from the two probes\' Wilson intervals) excludes 0; the intervals cover the test '
            'images only, not run-to-run variation (seeds, CPU rounding), which one seed per '
            'run cannot measure.</p>'
            f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody>'
            "</table></div>")


def _failures(results: Results) -> str:
    f = results.failures
    if f is None or len(f) == 0:
        return ""
    cols = list(f.columns)
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>"
                   for row in f.astype(str).itertuples(index=False))
    return (f'<p class="note"><b>{len(f)} checkpoint{"s" if len(f) != 1 else ""} could not be '
            f"analysed</b> and are missing from every chart and table:</p>"
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
            f"</table></div>")


def _transfer_section(results: Results) -> str:
    """Cross-dataset transfer per epoch and how well each score predicted it (Kendall tau)."""
    names = results.downstream_datasets()
    if not names:
        return ""
    per_epoch = results.transfer()
    cols = [c for c in per_epoch.columns if c not in ("run", "epoch")]
    labels = {"mean": "mean accuracy", "log_odds": "mean log-odds"}
    head = "<tr><th>run</th><th>epoch</th>" + "".join(
        f"<th>{_esc(labels.get(c, c))}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td>{_esc(r['run'])}</td><td class=num>{int(r['epoch'])}</td>"
        + "".join(f"<td class=num>{_fmt(r[c])}</td>" for c in cols) + "</tr>"
        for _, r in per_epoch.iterrows())
    tau = results.score_rank_correlation()
    tau_html = '<p class="note">Too few epochs to rank-correlate the scores.</p>'
    if not tau.empty:
        wide = tau.pivot_table(index=["run", "score"], columns="dataset", values="tau",
                               aggfunc="mean", dropna=False, sort=False)
        dcols = [c for c in [*names, "mean"] if c in wide.columns]
        thead = "<tr><th>run</th><th>score</th>" + "".join(
            f"<th>{_esc(c)}</th>" for c in dcols) + "</tr>"
        tbody = "".join(
            f"<tr><td>{_esc(run)}</td><td>{_esc(score)}</td>"
            + "".join(f"<td class=num>{_signed(float(wide.loc[(run, score), c]))}</td>"
                      for c in dcols) + "</tr>"
            for run, score in wide.index)
        tau_html = ('<p class="note">Kendall &tau;-b, across the epochs of each run, between a '
                    "score computed on the downstream dataset's features and the linear-probe "
                    "accuracy on that dataset (+1: the score ranks the checkpoints exactly as "
                    "their transfer does). <code>source_accuracy</code> is the baseline a score "
                    "should beat.</p>"
                    f'<div class="scroll"><table><thead>{thead}</thead><tbody>{tbody}</tbody>'
                    "</table></div>")
    protocols_html = _protocols(results)
    return (f'<p class="note">Frozen penultimate features of every checkpoint, linear-probed on '
            f"{len(names)} other dataset{'s' if len(names) != 1 else ''} "
            f"({_esc(', '.join(names))}) prepared with the source model's input preprocessing "
            "(Kornblith et al. 2021). The mean log-odds is the aggregate of t-ReX "
            "(Sariyildiz et al. 2023).</p>"
            f'<div class="scroll"><table><thead>{head}</thead><tbody>{body}</tbody></table></div>'
            '<h3 id="score-rank-correlation">Which transferability score predicts transfer over '
            f"training?</h3>{tau_html}{protocols_html}")


def _protocols(results: Results) -> str:
    """Best epoch of transfer under the linear probe, few-shot and fine-tuning, and whether it
    is the same epoch under all of them."""
    peaks = results.protocol_peaks()
    if peaks.empty or peaks["protocol"].nunique() < 2:
        return ""
    protos = list(dict.fromkeys(peaks["protocol"]))
    head = "<tr><th>run</th><th>dataset</th>" + "".join(
        f"<th>{_esc(p)}: best (epoch) &rarr; last</th>" for p in protos) + \
        "<th>same best epoch?</th></tr>"
    body = []
    verdicts = []
    for (run, dataset), g in peaks.groupby(["run", "dataset"], sort=False):
        by = {r.protocol: r for r in g.itertuples()}
        cells = "".join(
            f"<td class=num>{_fmt(by[p].best)} ({int(by[p].best_epoch)}) &rarr; "
            f"{_fmt(by[p].last)}</td>" if p in by else "<td>n/a</td>" for p in protos)
        same = bool(g["same_best_epoch"].iloc[0]) and len(g) > 1
        body.append(f"<tr><td>{_esc(run)}</td><td>{_esc(dataset)}</td>{cells}"
                    f"<td>{'yes' if same else 'no'}</td></tr>")
        epochs = ", ".join(f"{r.protocol} {int(r.best_epoch)}" for r in g.itertuples())
        verdicts.append(f"{_esc(run)} on {_esc(dataset)}: "
                        + ("the same epoch under every protocol" if same
                           else f"different epochs ({_esc(epochs)})"))
    metrics = ", ".join(f"{p} = <code>{_esc(m)}</code>" for p, m in
                        dict(zip(peaks["protocol"], peaks["metric"], strict=False)).items())
    return ('<h3 id="transfer-protocols">Is the epoch of best transfer the same under every '
            'protocol?</h3><p class="note">Islam et al. (2021) measure transfer three ways; '
            "Kornblith et al. (2021) find that the loss matters little once the network is "
            f"fine-tuned. Protocols: {metrics}. Epoch of best transfer: "
            + "; ".join(verdicts) + ".</p>"
            f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _charts(results: Results, dpi: int) -> tuple[str, list[tuple[str, str]]]:
    import matplotlib.pyplot as plt

    from dtprobe.plotting import iter_figures, style  # matplotlib only when charts are drawn

    blocks = []
    toc = []
    for name, caption, fig in iter_figures(results):
        try:
            buf = io.BytesIO()
            with style():
                fig.savefig(buf, format="png", dpi=dpi)
        finally:
            plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        anchor = f"chart-{name}"
        title = name.replace("_", " ")
        toc.append((anchor, title))
        blocks.append(f'<figure id="{_esc(anchor)}"><img alt="{_esc(title)}" '
                      f'src="data:image/png;base64,{data}"><figcaption><b>{_esc(title)}.</b> '
                      f"{_esc(caption)}</figcaption></figure>")
    if not blocks:
        return '<p class="note">No chart can be drawn from the available metrics.</p>', toc
    return "".join(blocks), toc


def render_report(results: Results, title: str | None = None, dpi: int = 110) -> str:
    """Return the report as one HTML string (see :func:`write_report`)."""
    # Duck-typed, so that this module stays above dtprobe.results.core without importing it
    # (Results.write_report is the front-end that imports this module on call).
    if not all(hasattr(results, a) for a in ("table", "runs", "epochs", "sources")):
        hint = ("wrap the table: dtprobe.results.Results(table)"
                if isinstance(results, pd.DataFrame) else
                "use dtprobe.results.load_results(run_dir)")
        raise ConfigError(f"write_report needs a Results object, got {type(results).__name__}; "
                          f"{hint}")
    runs = results.runs
    title = title or ("dtprobe report: " + (" vs ".join(runs) if runs else "no runs"))
    epochs = results.epochs()
    span = f"epochs {epochs[0]}\u2013{epochs[-1]}" if epochs else "no epochs"
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sources = "; ".join(f"{_esc(r)}: <code>{_esc(p)}</code>" for r, p in results.sources.items())
    charts, chart_toc = _charts(results, dpi)
    # findings and the run comparison first, then the charts; settings come last (collapsed)
    sections = [
        ("findings", "Key findings", _findings(results) + _failures(results)),
        *([("transfer", "Transfer to other datasets", _transfer_section(results))]
          if results.downstream_datasets() else []),
        ("compare", "Run vs run (e.g. CE vs CTC)", _run_comparison(results)),
        ("charts", "Charts", charts),
        ("summary", "Summary: first, best and last value of every metric", _summary_table(results)),
        ("uncertainty", "Uncertainty: run differences beyond their intervals",
         _uncertainty(results)),
        ("runs", "Run configurations", _config_table(results)),
        ("estimators", "Estimators and parameters", _estimator_table(results)),
    ]
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    chart_nav = " &middot; ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in chart_toc)
    body = "".join(
        f'<section id="{a}"><h2>{_esc(t)}</h2>'
        + (f'<p class="note">{chart_nav}</p>' if a == "charts" and chart_toc else "")
        + f"{content}</section>" for a, t, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<header><h1>{_esc(title)}</h1><p class=\"meta\">{len(runs)} run"
        f"{'s' if len(runs) != 1 else ''} ({_esc(', '.join(runs))}), {span}, "
        f"{len(results.metrics)} metrics &middot; generated {_esc(when)} by dtprobe "
        f"{_esc(__version__)}" + (f"<br>{sources}" if sources else "") + "</p></header>"
        f"<nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(results: Results, out_html: str | Path, title: str | None = None,
                 dpi: int = 110) -> Path:
    """Write one self-contained HTML report of ``results`` to ``out_html``.

    Parameters
    ----------
    results : :class:`~dtprobe.results.Results` (e.g. from :func:`~dtprobe.results.compare`).
    out_html : path of the HTML file; parent directories are created. Written atomically.
    title : page title (default ``"dtprobe report: <run> vs <run>"``).
    dpi : resolution of the embedded PNG charts.

    Returns
    -------
    Path
        ``out_html``. The page holds the run configurations side by side (differences
        highlighted), every chart the metrics allow (base64-embedded PNG), where each
        downstream probe peaked, the first/best/last table and the estimator parameters;
        it loads nothing from the network.
    """
    page = render_report(results, title=title, dpi=dpi)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    cm.atomic_write_text(out, page)  # unpredictable temp name, never through a planted link
    return out
