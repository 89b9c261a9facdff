"""Fine-tuning per checkpoint (dtprobe.training.finetune, dtprobe.analysis.finetune): the recipe
against a plain loop written from its description, the learning-rate choice, divergence, and
the analysis rows (stored as parts, reused, resumed after a loss)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dtprobe.training.augment import shift_flip
from dtprobe.training.finetune import FINETUNE_RECIPE, finetune


class _Net(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None] * 1.5
    return x, y


RECIPE = {"epochs": 2, "batch_size": 8, "lr_grid": (0.02, 0.1), "head_init": "zeros"}


def _reference(model, x, y, xt, yt, lr, gen_seed, fit, val):
    """The recipe, written out: zero head, SGD(0.9, wd 5e-4), per-step cosine to 0, random
    shift (1/8 padding), BatchNorm in train mode; scored in eval mode."""
    m = copy.deepcopy(model).double()
    m.fc = nn.Linear(4, 2).double()
    nn.init.zeros_(m.fc.weight)
    nn.init.zeros_(m.fc.bias)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(gen_seed)
    total = math.ceil(len(fit) / 8) * 2
    step = 0
    m.train()
    for _ in range(2):
        order = torch.as_tensor(fit)[torch.randperm(len(fit), generator=g)]
        for s in range(0, len(order), 8):
            rows = order[s:s + 8]
            xb = shift_flip(x[rows], "crop", g).double()
            for group in opt.param_groups:
                group["lr"] = lr * (1 + math.cos(math.pi * step / total)) / 2
            loss = F.cross_entropy(m(xb), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    m.eval()
    with torch.no_grad():
        val_acc = float((m(x[val].double()).argmax(1) == y[val]).double().mean())
        test_acc = float((m(xt.double()).argmax(1) == yt).double().mean())
    return val_acc, test_acc


def test_finetune_equals_the_recipe_written_out_and_leaves_the_model_alone():
    from dtprobe.metrics.probes import stratified_split

    torch.manual_seed(0)
    model = _Net()
    before = copy.deepcopy(model.state_dict())
    x, y = _data(60, 1)
    xt, yt = _data(40, 2)
    res = finetune(model, "fc", x, y, xt, yt, seed=3, recipe=RECIPE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    fit, val = stratified_split(y.numpy(), 0.2, seed=3)
    assert (res.n_train, res.n_val, res.n_test) == (len(fit), len(val), 40)
    for i, lr in enumerate(RECIPE["lr_grid"]):
        val_acc, test_acc = _reference(model, x, y, xt, yt, lr, 3 * 1000 + i, fit, val)
        assert res.val_accuracy[lr] == pytest.approx(val_acc, abs=1 / len(val) + 1e-9)
        assert res.test_by_lr[lr] == pytest.approx(test_acc, abs=1.5 / 40)
    best = max(RECIPE["lr_grid"], key=lambda lr: (res.val_accuracy[lr], -lr))
    assert res.best_lr == best and res.test_accuracy == res.test_by_lr[best]
    assert res.test_accuracy > 0.8  # the two classes are separable: fine-tuning learns them
    again = finetune(model, "fc", x, y, xt, yt, seed=3, recipe=RECIPE)
    assert again.test_by_lr == res.test_by_lr  # seeded


def test_lp_ft_head_is_the_ridge_probe_of_the_frozen_features():
    """The LP-FT head, folded back to raw features, gives the ridge classifier's decision
    function (scikit-learn's RidgeClassifier on the standardised frozen features)."""
    from sklearn.linear_model import RidgeClassifier

    from dtprobe.training.finetune import _probe_head, _replace_head

    torch.manual_seed(0)
    model = _Net(classes=5)
    x, _ = _data(50, 4)
    y = torch.arange(50) % 3
    head = _replace_head(model, "fc", 3)
    idx = np.arange(50)
    acc = _probe_head(model, head, x, y, idx, torch.device("cpu"))
    with torch.no_grad():
        feats = F.relu(model.bn(model.conv(x))).mean(dim=(2, 3)).double().numpy()
        out = model(x).double().numpy()
    from dtprobe.metrics.fewshot import FewShotRidge

    ridge = FewShotRidge(standardize=False).fit(feats, y.numpy())
    xs = feats
    ref = RidgeClassifier(alpha=ridge.alpha_).fit(xs, y.numpy())
    np.testing.assert_allclose(out, ref.decision_function(xs), atol=1e-4)
    assert acc == pytest.approx(ref.score(xs, y.numpy()))


def test_a_diverging_rate_is_dropped_and_all_diverging_is_one_line():
    torch.manual_seed(0)
    model = _Net()
    x, y = _data(40, 1)
    res = finetune(model, "fc", x, y, x, y, recipe={**RECIPE, "lr_grid": (0.05, 1e9),
                                                    "head_init": "ridge"})
    assert res.diverged == [1e9] and res.best_lr == 0.05 and np.isfinite(res.test_accuracy)
    bad = finetune(model, "fc", x, y, x, y, recipe={**RECIPE, "lr_grid": (1e9, 1e10)})
    assert np.isnan(bad.test_accuracy) and bad.best_lr is None
    assert "diverged" in bad.error and "\n" not in bad.error
    from dtprobe.errors import MetricInputError

    with pytest.raises(MetricInputError, match="1 class"):
        finetune(model, "fc", x, torch.zeros_like(y), x, y, recipe=RECIPE)


def test_analysis_finetune_rows_are_stored_reused_and_resumed(tmp_path, monkeypatch):
    from dtprobe import analysis
    from dtprobe.analysis import finetune as ft
    from dtprobe.training.trainer import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), dataset="shapes",
                      dataset_params={"n_train": 120, "n_test": 60, "image_size": 16},
                      arch="small_cnn", arch_params={"width": 4, "feature_dim": 16}, epochs=1,
                      batch_size=64, save_every=1, seed=0, device="cpu", progress=False))
    calls = []
    real = ft.finetune

    def short(*args, **kw):
        calls.append(1)
        return real(*args, **{**kw, "recipe": {"epochs": 1, "lr_grid": (0.01,)}})

    monkeypatch.setattr(ft, "finetune", short)
    kw = dict(metrics=["source_accuracy"], device="cpu", progress=False, plot=False,
              downstream=["textures:n_train=60,n_test=30"], downstream_metrics=["fewshot_ncm"],
              fewshot_shots=(1,), finetune=True)
    res = analysis.analyze(run, **kw)
    rows = res.table[res.table["metric"] == "finetune_accuracy"]
    assert sorted(rows["epoch"]) == [0, 1] and rows["value"].notna().all()
    assert set(rows["task"]) == {"textures"} and len(calls) == 2
    params = json.loads(rows["params"].iloc[0])
    assert params["momentum"] == FINETUNE_RECIPE["momentum"] and params["downstream"]
    diag = json.loads(rows["diagnostics"].iloc[0])
    assert diag["best_lr"] == 0.01 and "chance" in diag and diag["device"] == "cpu"
    csv = (run / "analysis" / "metrics.csv").read_bytes()
    analysis.analyze(run, **kw)
    assert len(calls) == 2  # finished fine-tunes are not redone
    assert (run / "analysis" / "metrics.csv").read_bytes() == csv
    (run / "analysis" / "parts" / "epoch_000001.finetune-textures.json").unlink()  # a kill
    again = analysis.analyze(run, **kw)
    assert len(calls) == 3  # only the lost one again, to the same values (its time differs)
    redone = again.table[again.table["metric"] == "finetune_accuracy"]
    assert list(redone["value"]) == list(rows["value"])

    def oom(*args, **kw):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore text")

    monkeypatch.setattr(ft, "finetune", oom)
    (run / "analysis" / "parts" / "epoch_000000.finetune-textures.json").unlink()
    failed = analysis.analyze(run, **kw).table
    failed = failed[(failed["metric"] == "finetune_accuracy") & (failed["epoch"] == 0)]
    assert failed["value"].isna().all()
    assert "fine-tune failed (CUDA out of memory. Tried to allocate 2 GiB)" in \
        json.loads(failed["diagnostics"].iloc[0])["error"]
    monkeypatch.setattr(ft, "finetune", short)
    retried = analysis.analyze(run, **kw).table  # not stored: tried again
    assert len(calls) == 4 and retried.loc[retried["metric"] == "finetune_accuracy",
                                           "value"].notna().all()


def _proto_table():
    """Two runs on one downstream dataset under three protocols (made-up values)."""
    import pandas as pd

    curves = {("ce", "probe_accuracy"): [0.9, 0.8, 0.7],
              ("ce", "fewshot_ridge_10shot"): [0.6, 0.7, 0.5],
              ("ce", "fewshot_ridge_1shot"): [0.3, 0.3, 0.2],
              ("ce", "finetune_accuracy"): [0.95, 0.96, 0.97],
              ("ls", "probe_accuracy"): [0.9, 0.85, 0.8],
              ("ls", "fewshot_ridge_10shot"): [0.7, 0.6, 0.5],
              ("ls", "finetune_accuracy"): [0.97, 0.95, 0.9]}
    rows = []
    for (run, metric), values in curves.items():
        for epoch, v in zip((0, 4, 8), values, strict=True):
            diag = {"chance": 0.1}
            if metric.startswith("fewshot"):
                diag.update(ci_low=v - 0.02, ci_high=v + 0.02)
            rows.append({"run": run, "epoch": epoch, "step": epoch, "metric": metric,
                         "task": "digits", "layer": "", "other_run": "", "value": v,
                         "estimator": "", "params": json.dumps({"downstream": "digits"}),
                         "diagnostics": json.dumps(diag)})
        rows.append({"run": run, "epoch": 8, "step": 8, "metric": "source_accuracy",
                     "task": "", "layer": "", "other_run": "", "value": 0.9, "estimator": "",
                     "params": "", "diagnostics": ""})
    return pd.DataFrame(rows)


def test_protocol_peaks_chart_and_report_say_whether_the_best_epoch_agrees(tmp_path):
    import matplotlib.pyplot as plt

    from dtprobe.plotting import iter_figures, plot_transfer_protocols
    from dtprobe.results import Results, protocol_peaks
    from dtprobe.results.report import render_report

    table = _proto_table()
    peaks = protocol_peaks(table).set_index(["run", "protocol"])
    assert peaks.loc[("ce", "few-shot"), "metric"] == "fewshot_ridge_10shot"  # 10 shots shown
    assert peaks.loc[("ce", "linear"), "best_epoch"] == 0
    assert peaks.loc[("ce", "few-shot"), "best_epoch"] == 4
    assert peaks.loc[("ce", "fine-tuned"), "best_epoch"] == 8
    assert peaks.loc[("ce", "fine-tuned"), "drop"] == pytest.approx(0.0)
    assert peaks.loc[("ls", "linear"), "drop"] == pytest.approx(0.1)
    assert not peaks.loc["ce", "same_best_epoch"].any()  # 0, 4, 8
    assert peaks.loc["ls", "same_best_epoch"].all()  # epoch 0 under all three
    fig = plot_transfer_protocols(table)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["digits"]
    plt.close(fig)
    names = []
    for name, _, f in iter_figures(Results(table)):
        names.append(name)
        plt.close(f)
    assert "transfer_protocols" in names
    html = render_report(Results(table))
    assert "Is the epoch of best transfer the same under every protocol?" in html
    assert "ce on digits: different epochs (linear 0, few-shot 4, fine-tuned 8)" in html
    assert "ls on digits: the same epoch under every protocol" in html


def test_recipe_entries_are_replaceable_recorded_and_checked():
    from dtprobe.analysis.finetune import recipe
    from dtprobe.analysis.plan import AnalysisOptions
    from dtprobe.errors import ConfigError

    assert recipe(AnalysisOptions()) == FINETUNE_RECIPE
    assert recipe(AnalysisOptions(finetune_recipe={"lr_grid": (0.01,)}))["lr_grid"] == (0.01,)
    with pytest.raises(ConfigError, match="unknown key.*lr; the recipe has"):
        recipe(AnalysisOptions(finetune_recipe={"lr": 0.1}))
