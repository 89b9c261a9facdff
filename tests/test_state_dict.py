"""The exact-fit search for a model's weights inside checkpoints
(dtprobe.checkpoints.state_dict)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from dtprobe import checkpoints as ck
from dtprobe.checkpoints import state_dict as sd
from dtprobe.errors import CheckpointError
from dtprobe.models import build_model, get_arch, guess_arch
from dtprobe.models.ctc_resnext import CTCResNeXt


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                     fc=nn.Linear(4, 2)))


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RAW = _net(0).state_dict()
EMA = _net(1).state_dict()


@pytest.mark.parametrize("obj, where, stripped", [
    (RAW, "", ""),
    ({"state_dict": _prefixed(RAW, "_orig_mod.")}, "state_dict", "_orig_mod."),
    ({"model": _prefixed(RAW, "_orig_mod.module.")}, "model", "_orig_mod.module."),
    ({"state_dict": _prefixed(RAW, "timm_model.")}, "state_dict", "timm_model."),
    # A LightningModule holding the net and a loss with a buffer of its own.
    ({"state_dict": {**_prefixed(RAW, "net."), "criterion.weight": torch.ones(2)}},
     "state_dict", "net."),
    # AveragedModel bookkeeping beside DDP keys must not stop the strip.
    ({"model": {"n_averaged": torch.tensor(3), **_prefixed(RAW, "module.")}}, "model",
     "module."),
])
def test_wrappers_and_prefixes_resolve_to_the_exact_weights(obj, where, stripped):
    model = _net(5)
    chosen = ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=obj), "f.pt")
    assert chosen.record()["where"] == where and chosen.record()["stripped"] == stripped
    assert _same(model.state_dict(), RAW)


def test_ema_choice_raw_by_default_ema_on_request_and_ema_only_files():
    obj = {"state_dict": RAW, "state_dict_ema": EMA, "epoch": 3}
    model = _net(5)
    assert not ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=obj), "f").ema
    assert _same(model.state_dict(), RAW)
    chosen = ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=obj), "f", weights="ema")
    assert chosen.ema and _same(model.state_dict(), EMA)
    chosen = ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=obj), "f",
                             weights="state_dict")
    assert not chosen.ema and _same(model.state_dict(), RAW)
    # torchvision's reference script: model_ema is an AveragedModel (n_averaged, module.).
    tv = {"model": RAW, "model_ema": {"n_averaged": torch.tensor(7), **_prefixed(EMA, "module.")}}
    chosen = ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=tv), "f", weights="ema")
    assert chosen.ema and _same(model.state_dict(), EMA)
    # A file that holds only EMA weights is recognised as such.
    only = {"n_averaged": torch.tensor(7), **_prefixed(EMA, "module.")}
    chosen = ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=only), "f")
    assert chosen.ema and _same(model.state_dict(), EMA)
    with pytest.raises(CheckpointError, match=r"only EMA weights.*pass --weights ema"):
        ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=only), "f", weights="raw")


def test_strip_prefix_flag_selects_one_of_two_fitting_networks():
    obj = {"state_dict": {**_prefixed(RAW, "student."), **_prefixed(EMA, "teacher.")}}
    model = _net(5)
    ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=obj), "f")
    assert _same(model.state_dict(), RAW)  # first in file order
    ck.load_weights(model, ck.LoadedCheckpoint({}, {}, source=obj), "f", strip_prefix="teacher.")
    assert _same(model.state_dict(), EMA)


def test_no_fit_names_keys_found_closest_candidate_and_the_fixing_flag():
    wrong = build_model("small_cnn", 7).state_dict()
    with pytest.raises(CheckpointError) as info:
        ck.load_weights(_net(), ck.LoadedCheckpoint({}, {}, source={"model": wrong}), "f.pt",
                        arch="x")
    msg = str(info.value)
    assert "top-level keys 'model'" in msg and "closest" in msg and "\n" not in msg
    assert "--arch small_cnn --num-classes 7" in msg
    three = {**RAW, "fc.weight": torch.ones(3, 4), "fc.bias": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"fc.weight \(checkpoint \(3, 4\), model \(2, 4\)"
                                              r".*--num-classes"):
        ck.load_weights(_net(), ck.LoadedCheckpoint({}, {}, source={"model": three}), "f")
    # Any wrapper prefix is found without a flag: the fit decides.
    deep = {"model": {**_prefixed(RAW, "extra.junk."), "other.w": torch.ones(1)}}
    ck.load_weights(_net(), ck.LoadedCheckpoint({}, {}, source=deep), "f")


def test_candidates_never_search_optimizer_states():
    moments = {"state": {0: {"momentum_buffer": torch.ones(4, 3, 3, 3)}}, "param_groups": []}
    found = sd.candidates({"optimizer": {"x": torch.ones(2)}, "model": RAW,
                           "optimizer_states": [moments]})
    assert all(c.where[:1] == ("model",) for c in found)


def test_ctc_paper_resnext_structure_and_parameter_count():
    model = CTCResNeXt(100)
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    assert abs(body - 1.06e6) < 0.01e6  # "about 1.06M parameters" (DESIGN.md)
    keys = list(model.state_dict())
    assert keys[0] == "conv_1_3x3.weight" and model.conv_1_3x3.out_channels == 32
    assert "stage_1.stage_1_bottleneck_0.conv_reduce.weight" in keys
    assert "stage_3.stage_3_bottleneck_4.bn_expand.running_var" in keys
    assert "stage_1.stage_1_bottleneck_0.shortcut.shortcut_conv.weight" in keys
    assert "stage_1.stage_1_bottleneck_1.shortcut.shortcut_conv.weight" not in keys
    assert [len(getattr(model, f"stage_{s}")) for s in (1, 2, 3)] == [5, 5, 5]
    assert model.classifier.in_features == 512
    feats = model.stage_3(model.stage_2(model.stage_1(torch.zeros(1, 32, 32, 32))))
    assert feats.shape == (1, 512, 8, 8)
    [g] = guess_arch(model.state_dict())
    assert (g.arch, g.num_classes) == ("ctc_resnext32_16x4d", 100)


def test_old_resnext_name_is_a_deprecated_alias_of_the_generic_network():
    with pytest.warns(FutureWarning, match="ctc_resnext32_16x4d"):
        spec = get_arch("resnext32_16x4d")
    assert spec.builder is get_arch("resnext_cifar").builder


def test_paper_resnet18_names_load_through_the_key_map():
    torch.manual_seed(0)
    ours = build_model("resnet18", 10, cifar_stem=True)
    paper = {k.replace("downsample", "shortcut").replace("fc.", "linear."): v
             for k, v in ours.state_dict().items()}
    assert any(".shortcut." in k for k in paper) and "linear.weight" in paper
    [g] = guess_arch(paper)
    assert (g.arch, g.kwargs, g.num_classes) == ("resnet18", {"cifar_stem": True}, 10)
    fresh = build_model("resnet18", 10, cifar_stem=True)
    chosen = ck.load_weights(fresh, ck.LoadedCheckpoint({}, {}, source={"model": paper}), "f",
                             key_maps=get_arch("resnet18").key_maps)
    assert chosen.key_map and _same(fresh.state_dict(), ours.state_dict())


def test_user_callable_architecture_with_kwargs(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, hidden=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(),\n"
        "                         nn.Linear(hidden, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    model = build_model("mynets:tiny", 3, hidden=6)
    from dtprobe.models import head_module

    assert head_module(model, "mynets:tiny").in_features == 6
    with pytest.raises(Exception, match="cannot import"):
        get_arch("nonexistent_pkg_xyz:f")
