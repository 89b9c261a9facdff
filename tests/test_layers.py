"""Layer x epoch diagnostics: --layers auto, per-layer metrics equal the metric functions on the
layer's pooled features (slow reference path), CKA between runs per layer, charts, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtprobe.analysis import analyze
from dtprobe.cli import main
from dtprobe.data import load_dataset
from dtprobe.errors import ConfigError
from dtprobe.metrics.separation import class_separation
from dtprobe.models import head_module
from dtprobe.models.layers import block_layers, describe_layers, penultimate_source
from dtprobe.models.registry import build_model
from dtprobe.plotting.layer_charts import (
    best_layer,
    layer_epoch_matrix,
    plot_best_layer,
    plot_layer_heatmap,
)
from dtprobe.training.trainer import TrainConfig, train

ARCH = {"width": 8, "feature_dim": 16}
METRICS = ["class_separation", "rankme", "source_accuracy", "knn_accuracy"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shapes_params):
    root = tmp_path_factory.mktemp("layers")
    for name, seed in (("a", 0), ("b", 1)):
        train(TrainConfig(out=str(root / name), dataset="shapes",
                          dataset_params=tiny_shapes_params, arch="small_cnn", arch_params=ARCH,
                          epochs=2, batch_size=64, save_every=1, seed=seed, device="cpu",
                          progress=False))
    return root


@pytest.fixture(scope="module")
def analysed(runs):
    return analyze(runs / "a", layers=["auto"], compare=[runs / "b"], metrics=METRICS,
                   device="cpu", progress=False, plot=False)


def test_auto_layers_are_the_blocks():
    cnn = build_model("small_cnn", 6, **ARCH)
    described = describe_layers(cnn, head_module(cnn, "small_cnn"), torch.randn(2, 3, 16, 16))
    assert penultimate_source(described) == "embed"  # its output is the penultimate feature
    assert block_layers(cnn, "fc", "embed") == ["features.0", "features.1", "features.3",
                                                "features.4", "features.6", "features.7"]
    r18 = build_model("resnet18", 10)
    assert block_layers(r18, "fc") == ["layer1", "layer2", "layer3", "layer4"]


def test_per_layer_rows_equal_the_metric_on_pooled_layer_features(analysed, runs,
                                                                   tiny_shapes_params):
    t = analysed.table
    layers = ["features.0", "features.1", "features.3", "features.4", "features.6",
              "features.7"]
    for metric in ("class_separation", "rankme", "knn_accuracy", "cka_to_final", "cka_to_run"):
        assert set(t.loc[t["metric"] == metric, "layer"]) == {"", *layers}, metric
    # slow reference: load the last checkpoint, hook one block, pool, apply the metric
    bundle = load_dataset("shapes", **tiny_shapes_params)
    state = torch.load(runs / "a" / "checkpoints" / "epoch_0002.pt", weights_only=True)["model"]
    net = build_model("small_cnn", bundle.num_classes, **ARCH)
    net.load_state_dict(state)
    net.eval()
    captured = {}

    def hook(_module, _inputs, output):  # returns None: the forward pass is not changed
        captured["x"] = output.mean(dim=(2, 3))

    net.get_submodule("features.4").register_forward_hook(hook)
    with torch.no_grad():
        net(bundle.test.images)
    ref = class_separation(captured["x"].double().numpy(), bundle.test.labels.numpy())
    got = t[(t["metric"] == "class_separation") & (t["layer"] == "features.4")
            & (t["epoch"] == 2)]["value"].iloc[0]
    assert got == pytest.approx(ref, rel=1e-5)  # float32 extraction with folded BatchNorm


def test_layer_matrix_best_layer_and_charts(analysed):
    m = layer_epoch_matrix(analysed, "knn_accuracy")
    assert list(m.index)[-1] == "penultimate" and list(m.index)[0] == "features.0"
    assert list(m.columns) == [0, 1, 2]
    best = best_layer(analysed, metric="knn_accuracy")
    assert list(best["epoch"]) == [0, 1, 2]
    for _, row in best.iterrows():
        assert row["value"] == pytest.approx(m[row["epoch"]].max())
    fig = plot_layer_heatmap(analysed, "cka_to_final", vmin=0, vmax=1)
    assert len(fig.axes) >= 1
    with pytest.raises(ConfigError, match="--layers auto"):
        plot_best_layer(analysed.table[analysed.table["layer"] == ""])


def test_layer_typo_is_one_line_with_the_blocks(runs, capsys):
    code = main(["analyze", str(runs / "a"), "--layers", "feature.4", "--no-progress",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "did you mean features.4" in err and "features.0 features.1" in err


def test_cli_layers_lists_modules(runs, capsys):
    assert main(["layers", str(runs / "a")]) == 0
    out = capsys.readouterr().out
    assert "* features.0" in out and "= embed" in out
    assert np.all([line.startswith("  ") for line in out.splitlines()[1:]])


def test_transformer_blocks_are_pooled_over_tokens():
    timm = pytest.importorskip("timm", reason="timm not installed (pip install 'dtprobe[timm]')")
    from dtprobe.features.extract import extract_features

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, pretrained=False,
                            img_size=32, patch_size=8)
    blocks = block_layers(vit, "head")
    assert "blocks.0" in blocks and "blocks.11" in blocks
    x = torch.randn(4, 3, 32, 32)
    out = extract_features(vit, vit.head, x, layers=["blocks.0"], device=torch.device("cpu"),
                           batch_size=4)
    captured = {}
    handle = vit.blocks[0].register_forward_hook(
        lambda m, i, o: captured.update(tokens=o.detach()))
    with torch.no_grad():
        vit.eval()(x)
    handle.remove()
    # one embed_dim vector per image: the mean over the 16 patch tokens + class token
    ref = captured["tokens"].mean(dim=1)
    assert out["layer:blocks.0"].shape == (4, vit.embed_dim)
    assert torch.allclose(out["layer:blocks.0"].float(), ref, atol=1e-4)


def test_downstream_datasets_per_layer(runs):
    res = analyze(runs / "a", layers=["features.4"], downstream=["digits"],
                  metrics=["source_accuracy"], downstream_metrics=["knn_accuracy", "logme"],
                  device="cpu", progress=False, plot=False)
    t = res.table
    knn = t[(t["metric"] == "knn_accuracy") & (t["task"] == "digits")]
    assert set(knn["layer"]) == {"", "features.4"}  # transfer per layer and epoch
    assert len(knn[knn["layer"] == "features.4"]) == 3
    # LogME is not a per-layer metric: it stays on the penultimate features
    assert set(t.loc[(t["metric"] == "logme") & (t["task"] == "digits"), "layer"]) == {""}
