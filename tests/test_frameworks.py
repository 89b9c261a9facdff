"""Checkpoint series written by real training frameworks, analysed with no loading flags.

Each test trains a tiny model for a few steps with the framework itself, keeps the framework's
own evaluation of every checkpoint on the digits test split, then runs ``dtprobe analyze RUN``
with only the dataset named, and checks that dtprobe found every checkpoint, numbered its
epochs as epochs completed (and its steps where the framework records them), rebuilt the
model from what the files say and measured exactly the framework's accuracy.

The packages come from the ``frameworks`` extra (``pip install -e '.[frameworks]'``, installed
by ``make test``); a test is skipped, saying which package is missing, when it is absent.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from dtprobe.cli import main
from dtprobe.data import load_dataset
from dtprobe.models import build_model

DATA = {"image_size": 8, "channels": 3}
DATA_ARGS = ["--dataset", "digits", "--dataset-param", "image_size=8",
             "--dataset-param", "channels=3"]
N_TRAIN, BATCH = 256, 64  # 4 steps per epoch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", **DATA)


def _train_loader(bundle, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(bundle.train.images[:N_TRAIN],
                                        bundle.train.labels[:N_TRAIN])
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, generator=g)


def _test_loader(bundle):
    ds = torch.utils.data.TensorDataset(bundle.test.images, bundle.test.labels)
    return torch.utils.data.DataLoader(ds, batch_size=128)


@torch.no_grad()
def _accuracy(model: nn.Module, bundle) -> float:
    """Plain evaluation of the framework's model object (eval mode, argmax of the logits)."""
    was = model.training
    model.eval()
    logits = model(bundle.test.images)
    logits = getattr(logits, "logits", logits)
    model.train(was)
    return float((logits.argmax(1) == bundle.test.labels).double().mean())


def _sgd_epoch(model, loader, opt):
    model.train()
    for x, y in loader:
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(getattr(out, "logits", out), y).backward()
        opt.step()


def _analyse(run: Path, *extra: str, code: int = 0) -> pd.DataFrame:
    got = main(["analyze", str(run), *DATA_ARGS, "--metrics", "source_accuracy", "--no-plot",
                "--no-progress", "--device", "cpu", *extra])
    assert got == code
    table = pd.read_csv(run / "analysis" / "metrics.csv")
    return table[table["metric"] == "source_accuracy"].set_index("epoch")


def _check(table: pd.DataFrame, expected: dict[int, float], steps: dict[int, int] | None = None):
    assert sorted(table.index) == sorted(expected), table
    for epoch, acc in expected.items():
        assert table.loc[epoch, "value"] == pytest.approx(acc, abs=1e-9), epoch
    if steps is not None:
        assert {e: int(table.loc[e, "step"]) for e in expected} == steps


def _record(run: Path) -> dict:
    return json.loads((run / "analysis" / "checkpoints.json").read_text())


# ---------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning", reason="needs lightning (pip install "
                                                    "'dtprobe[frameworks]')")


def _lit_module(L, net_factory, save_net_in_hparams: bool):
    class Lit(L.LightningModule):
        def __init__(self, arch: str = "small_cnn", num_classes: int = 10, lr: float = 0.05,
                     net: nn.Module | None = None):
            super().__init__()
            if save_net_in_hparams:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.save_hyperparameters()  # pickles the module, as templates do
            else:
                self.save_hyperparameters(ignore=["net"])
            self.net = net if net is not None else net_factory()
            # A loss with a buffer of its own: a second attribute in the state dict.
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(num_classes))
            self.correct = self.seen = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return self.criterion(self(x), y)

        def on_validation_epoch_start(self):
            self.correct = self.seen = 0

        def validation_step(self, batch, _):
            x, y = batch
            self.correct += int((self(x).argmax(1) == y).sum())
            self.seen += len(y)

        def on_validation_epoch_end(self):
            self.log("val_acc", self.correct / self.seen)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Lit


def _fit_lightning(L, run: Path, digits, module, epochs: int = 2) -> dict[int, float]:
    accs: dict[int, float] = {}

    class Keep(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            # The validation loop's own count (the logged val_acc is that, in float32).
            accs[trainer.current_epoch] = pl_module.correct / pl_module.seen

    ckpt = L.pytorch.callbacks.ModelCheckpoint(filename="{epoch}-{val_acc:.2f}", save_top_k=-1,
                                               monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=epochs, default_root_dir=str(run), accelerator="cpu",
                        callbacks=[ckpt, Keep()], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        logger=L.pytorch.loggers.CSVLogger(str(run)), log_every_n_steps=1)
    torch.manual_seed(0)
    trainer.fit(module, _train_loader(digits), _test_loader(digits))
    return accs


def test_lightning_nested_layout_metric_names_attribute_prefix_and_hparams(tmp_path, digits):
    L = _lightning()
    run = tmp_path / "lit"
    torch.manual_seed(0)
    Lit = _lit_module(L, lambda: build_model("small_cnn", 10, in_channels=3), False)
    accs = _fit_lightning(L, run, digits, Lit())
    files = sorted(p.name for p in run.rglob("*.ckpt"))
    assert files[0].startswith("epoch=0-val_acc=") and len(files) == 2
    table = _analyse(run)
    # Lightning's epoch=e (counted from 0 after the first epoch) is e+1 epochs completed.
    _check(table, {e + 1: acc for e, acc in accs.items()}, steps={1: 4, 2: 8})
    record = _record(run)
    assert record["layouts"] == ["lightning"] and "e+1" in record["epoch_note"]
    assert record["model"]["origin"] == "Lightning hyper_parameters"
    assert record["checkpoints"][0]["loaded"]["stripped"] == "net."
    assert record["load"]["trust_pickles"] is False


def test_lightning_pickled_hyperparameters_need_the_trust_pickles_opt_in(tmp_path, digits,
                                                                         capsys):
    L = _lightning()
    run = tmp_path / "litpickle"
    torch.manual_seed(0)
    Lit = _lit_module(L, None, True)
    accs = _fit_lightning(L, run, digits, Lit(net=build_model("small_cnn", 10, in_channels=3)),
                          epochs=1)
    assert main(["analyze", str(run), *DATA_ARGS, "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "--trust-pickles" in err
    assert not (run / "analysis" / "metrics.csv").exists()
    table = _analyse(run, "--trust-pickles")
    _check(table, {1: accs[0]}, steps={1: 4})
    record = _record(run)
    assert record["load"]["trust_pickles"] is True
    assert record["checkpoints"][0]["loaded"]["trusted_pickle"] is True


# ------------------------------------------------------------------- Hugging Face Trainer
def test_hf_trainer_checkpoint_folders_steps_epochs_and_config(tmp_path, digits):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install "
                                                              "'dtprobe[frameworks]')")
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate")
    import numpy as np

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, split, n=None):
            self.x, self.y = split.images[:n], split.labels[:n]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[1, 1], layer_type="basic", num_labels=10)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config)
    run = tmp_path / "hf"
    args = transformers.TrainingArguments(
        output_dir=str(run), num_train_epochs=2, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=128, save_strategy="epoch", eval_strategy="epoch",
        logging_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        learning_rate=0.05, dataloader_num_workers=0)

    def accuracy(pred):
        return {"accuracy": float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))}

    trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(digits.train,
                                                                               N_TRAIN),
                                   eval_dataset=Pairs(digits.test), compute_metrics=accuracy)
    trainer.train()
    evals = {int(h["epoch"]): h["eval_accuracy"] for h in trainer.state.log_history
             if "eval_accuracy" in h}
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    table = _analyse(run)
    # The folder number is a global step; the epoch comes from trainer_state.json.
    _check(table, evals, steps={1: 4, 2: 8})
    record = _record(run)
    assert record["layouts"] == ["hf_trainer"]
    assert record["model"]["origin"] == "Hugging Face config.json"
    assert [c["epoch_basis"] for c in record["checkpoints"]] == ["metadata", "metadata"]


# ------------------------------------------------------------------------------ accelerate
def test_accelerate_save_state_folders_are_numbered_in_save_order(tmp_path, digits):
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate (pip install "
                                                          "'dtprobe[frameworks]')")
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    run = tmp_path / "acc"
    acc = accelerate.Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(run), automatic_checkpoint_naming=True))
    try:
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, in_channels=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model, opt, loader = acc.prepare(model, opt, _train_loader(digits))
        accs = {}
        for epoch in (1, 2, 3):
            model.train()
            for x, y in loader:
                opt.zero_grad()
                acc.backward(F.cross_entropy(model(x), y))
                opt.step()
            acc.save_state()
            accs[epoch] = _accuracy(acc.unwrap_model(model), digits)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert (run / "checkpoints" / "checkpoint_0" / "model.safetensors").exists()
    table = _analyse(run)
    _check(table, accs)
    record = _record(run)
    assert record["layouts"] == ["accelerate"] and "position in the series" in record[
        "epoch_note"]
    assert [c["epoch_basis"] for c in record["checkpoints"]] == ["order"] * 3


# ------------------------------------------------------------------------------------ timm
def test_timm_checkpoint_saver_experiment_folder_arch_and_ema(tmp_path, digits):
    timm = pytest.importorskip("timm", reason="needs timm (pip install 'dtprobe[frameworks]')")
    from timm.utils import CheckpointSaver, ModelEmaV3

    run = tmp_path / "timmrun"
    exp = run / "output" / "train" / "20260101-000000-test_resnet-8"
    exp.mkdir(parents=True)
    args = argparse.Namespace(model="test_resnet", num_classes=10, lr=0.05, epochs=2)
    (exp / "args.yaml").write_text("model: test_resnet\nnum_classes: 10\n")  # as train.py does
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    saver = CheckpointSaver(model=model, optimizer=opt, args=args, model_ema=ema,
                            checkpoint_dir=str(exp), recovery_dir=str(exp), decreasing=False,
                            max_history=10)
    raw, averaged = {}, {}
    for epoch in (0, 1):
        model.train()
        for x, y in _train_loader(digits, epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ema.update(model)
        raw[epoch + 1], averaged[epoch + 1] = _accuracy(model, digits), _accuracy(ema.module,
                                                                                  digits)
        saver.save_checkpoint(epoch, metric=raw[epoch + 1])
    assert (exp / "checkpoint-0.pth.tar").exists() and (exp / "last.pth.tar").exists()
    _check(_analyse(run), raw)  # timm's epoch e (from 0) is e+1 completed; raw weights default
    record = _record(run)
    assert record["layouts"] == ["timm"] and record["model"]["arch"] == "timm:test_resnet"
    assert record["checkpoints"][0]["loaded"]["weights"] == "raw"
    _check(_analyse(run, "--weights", "ema"), averaged)
    assert _record(run)["checkpoints"][0]["loaded"]["where"] == "state_dict_ema"


# -------------------------------------------------------------- torchvision reference script
class _TorchvisionEMA(torch.optim.swa_utils.AveragedModel):
    """As references/classification/utils.py: EMA through AveragedModel (keeps n_averaged)."""

    def __init__(self, model, decay):
        def ema_avg(avg, param, num_averaged):
            return decay * avg + (1 - decay) * param

        super().__init__(model, avg_fn=ema_avg, use_buffers=True)


def test_torchvision_reference_script_checkpoints_args_model_and_model_ema(tmp_path, digits):
    import torchvision

    run = tmp_path / "tv"
    run.mkdir()
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    ema = _TorchvisionEMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    args = argparse.Namespace(model="resnet18", lr=0.05, epochs=2, output_dir=str(run))
    raw, averaged = {}, {}
    for epoch in range(2):  # the script counts epochs from 0 and saves after each
        _sgd_epoch(model, _train_loader(digits, epoch), opt)
        ema.update_parameters(model)
        checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "lr_scheduler": sched.state_dict(), "epoch": epoch, "args": args,
                      "model_ema": ema.state_dict()}
        torch.save(checkpoint, run / f"model_{epoch}.pth")
        torch.save(checkpoint, run / "checkpoint.pth")
        raw[epoch + 1], averaged[epoch + 1] = _accuracy(model, digits), _accuracy(ema.module,
                                                                                  digits)
    _check(_analyse(run), raw)
    record = _record(run)
    assert record["layouts"] == ["torchvision"]
    assert record["model"] == {"arch": "resnet18", "num_classes": 10, "kwargs": {},
                               "origin": "torchvision args.model"}
    _check(_analyse(run, "--weights", "ema"), averaged)
    loaded = _record(run)["checkpoints"][1]["loaded"]
    assert loaded["where"] == "model_ema" and loaded["stripped"] == "module."


# --------------------------------------------------- the CTC paper's code (dt-tradeoff)
def test_ctc_reference_code_resnext_under_dataparallel(tmp_path, digits):
    run = tmp_path / "save" / "models" / "resnext32_16x4d"
    run.mkdir(parents=True)
    torch.manual_seed(0)
    model = nn.DataParallel(build_model("ctc_resnext32_16x4d", 10))  # module. keys, as on GPUs
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    accs = {}
    for epoch in (1, 2):  # its epochs count from 1
        _sgd_epoch(model, _train_loader(digits, epoch), opt)
        accs[epoch] = _accuracy(model, digits)
        torch.save({"epoch": epoch, "model": model.state_dict(), "accuracy": accs[epoch]},
                   run / f"ckpt_epoch_{epoch}.pth")
    _check(_analyse(run), accs)
    record = _record(run)
    assert record["model"]["arch"] == "ctc_resnext32_16x4d"
    assert record["model"]["origin"].startswith("parameter names and shapes")
    assert "0 = initialisation" in record["epoch_note"]


def test_ctc_reference_code_resnet18_names(tmp_path, digits):
    run = tmp_path / "r18"
    run.mkdir()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, cifar_stem=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    accs = {}
    for epoch in (1, 2):
        _sgd_epoch(model, _train_loader(digits, epoch), opt)
        accs[epoch] = _accuracy(model, digits)
        paper = {k.replace(".downsample.", ".shortcut.").replace("fc.", "linear."): v
                 for k, v in model.state_dict().items()}  # models/resnetv2.py names
        torch.save({"epoch": epoch, "model": {f"module.{k}": v for k, v in paper.items()}},
                   run / f"ckpt_epoch_{epoch}.pth")
    _check(_analyse(run), accs)
    record = _record(run)
    assert record["model"]["arch"] == "resnet18" and record["model"]["kwargs"] == {
        "cifar_stem": True}
    assert record["checkpoints"][0]["loaded"]["key_map"] == "dt-tradeoff/CRD resnetv2"


# ------------------------------------------------------- DDP, torch.compile, EMA, safetensors
def test_ddp_under_torch_compile_nested_prefixes(tmp_path, digits):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        run = tmp_path / "ddp"
        run.mkdir()
        torch.manual_seed(0)
        ddp = DDP(build_model("small_cnn", 10, in_channels=3))
        compiled = torch.compile(ddp, backend="eager")  # an OptimizedModule: _orig_mod. keys
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        accs = {}
        for epoch in (1, 2):
            _sgd_epoch(ddp, _train_loader(digits, epoch), opt)
            accs[epoch] = _accuracy(ddp.module, digits)
            state = compiled.state_dict()
            assert next(iter(state)).startswith("_orig_mod.module.")
            torch.save({"model": state, "epoch": epoch}, run / f"checkpoint_{epoch}.pt")
    finally:
        dist.destroy_process_group()
    _check(_analyse(run), accs)
    assert _record(run)["checkpoints"][0]["loaded"]["stripped"] == "_orig_mod.module."


def test_ema_only_safetensors_with_metadata(tmp_path, digits):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    run = tmp_path / "ema"
    run.mkdir()
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    accs, step = {}, 0
    for epoch in (1, 2):
        for x, y in _train_loader(digits, epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ema.update_parameters(model)
            step += 1
        accs[epoch] = _accuracy(ema.module, digits)
        state = {k: v.contiguous() for k, v in ema.state_dict().items()}
        assert "n_averaged" in state
        save_file(state, run / f"ema_epoch_{epoch}.safetensors",
                  metadata={"epoch": str(epoch), "step": str(step)})
    _check(_analyse(run), accs, steps={1: 4, 2: 8})
    assert _record(run)["checkpoints"][0]["loaded"]["weights"] == "ema"


def test_plain_safetensors_epochs_and_steps_from_metadata(tmp_path, digits):
    run = tmp_path / "st"
    run.mkdir()
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    accs = {}
    for epoch in (1, 2):
        _sgd_epoch(model, _train_loader(digits, epoch), opt)
        accs[epoch] = _accuracy(model, digits)
        save_file(model.state_dict(), run / f"model_{epoch}.safetensors",
                  metadata={"epoch": str(epoch), "step": str(4 * epoch)})
    _check(_analyse(run), accs, steps={1: 4, 2: 8})


# ------------------------------------------------------------------------------- --compare
def test_compare_pairs_epochs_across_conventions_and_uses_the_flags_given(tmp_path, digits,
                                                                         monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, hidden=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, hidden),\n"
        "                         nn.ReLU(), nn.Linear(hidden, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynets

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    (theirs / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    model = mynets.tiny(10, hidden=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for epoch in (1, 2):
        _sgd_epoch(model, _train_loader(digits, epoch), opt)
        state = model.state_dict()
        torch.save({"epoch": epoch, "model": state}, ours / f"ckpt_epoch_{epoch}.pth")
        # The same weights as Lightning writes them: epoch counted from 0, "model." attribute.
        torch.save({"epoch": epoch - 1, "global_step": 4 * epoch,
                    "state_dict": {f"model.{k}": v for k, v in state.items()}},
                   theirs / "lightning_logs/version_0/checkpoints" /
                   f"epoch={epoch - 1}-step={4 * epoch}.ckpt")
    flags = ["--arch", "mynets:tiny", "--num-classes", "10", "--arch-param", "hidden=6"]
    table = _analyse(ours, *flags, "--compare", str(theirs))
    full = pd.read_csv(ours / "analysis" / "metrics.csv")
    cka = full[full["metric"] == "cka_to_run"].set_index("epoch")["value"]
    # Paired by epochs completed: each pair holds identical weights (CKA 1); epochs differ.
    assert sorted(cka.index) == [1, 2] and cka.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert full[full["metric"] == "cka_to_final"].set_index("epoch")["value"][1] < 0.999
    assert sorted(table.index) == [1, 2]
