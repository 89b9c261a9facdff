"""Framework callbacks write manifests that `dtprobe analyze` reads with no flags.

Tested against the real Lightning and transformers packages on a tiny model (the
``frameworks`` extra, installed by `make test`); skipped with a reason where absent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import checkpoints_manifest as cm
from dtprobe.analysis import analyze
from dtprobe.data import load_dataset
from dtprobe.integrations import CheckpointRecorder
from dtprobe.models.registry import build_model

ARCH_PARAMS = {"width": 8, "feature_dim": 16}


@pytest.fixture(scope="module")
def bundle(tiny_shapes_params):
    return load_dataset("shapes", **tiny_shapes_params)


def _accuracy(net: torch.nn.Module, bundle) -> float:
    net.eval()
    with torch.no_grad():
        pred = net(bundle.test.images).argmax(dim=1)
    return float((pred == bundle.test.labels).double().mean())


def _source_accuracy(results, epoch: int) -> float:
    t = results.table
    row = t[(t["metric"] == "source_accuracy") & (t["epoch"] == epoch)]
    return float(row["value"].iloc[0])


def _dataset_spec(params):
    return {"name": "shapes", "params": dict(params)}


def test_plain_loop_recorder(tmp_path, bundle, tiny_shapes_params):
    torch.manual_seed(0)
    net = build_model("small_cnn", bundle.num_classes, **ARCH_PARAMS)
    rec = CheckpointRecorder(tmp_path / "loop", arch="small_cnn", num_classes=bundle.num_classes,
                             arch_params=ARCH_PARAMS, dataset=_dataset_spec(tiny_shapes_params),
                             training={"epochs": 2})
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec.save(net, epoch=0, step=0)
    for epoch in (1, 2):
        net.train()
        loss = F.cross_entropy(net(bundle.train.images), bundle.train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.save(net, epoch=epoch, step=epoch, metrics={"loss": float(loss)})
    manifest = cm.read_manifest(tmp_path / "loop")
    assert [(c.epoch, c.step) for c in manifest.checkpoints] == [(0, 0), (1, 1), (2, 2)]
    res = analyze(tmp_path / "loop", metrics=["source_accuracy"], device="cpu", progress=False,
                  plot=False)
    assert _source_accuracy(res, 2) == pytest.approx(_accuracy(net, bundle), abs=1e-12)


def test_lightning_checkpoints_analyse_with_no_flags(tmp_path, bundle, tiny_shapes_params):
    L = pytest.importorskip("lightning.pytorch", reason="lightning not installed "
                            "(pip install 'dtprobe[frameworks]')")
    from dtprobe.integrations.lightning import ManifestModelCheckpoint

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model("small_cnn", bundle.num_classes, **ARCH_PARAMS)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    loader = DataLoader(TensorDataset(bundle.train.images, bundle.train.labels), batch_size=64)
    run = tmp_path / "lightning"
    ckpt = ManifestModelCheckpoint(run, arch="small_cnn", num_classes=bundle.num_classes,
                                   arch_params=ARCH_PARAMS,
                                   dataset=_dataset_spec(tiny_shapes_params),
                                   training={"epochs": 2}, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=2, callbacks=[ckpt], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    manifest = cm.read_manifest(run)
    steps_per_epoch = len(loader)
    assert [(c.epoch, c.step) for c in manifest.checkpoints] == [
        (0, 0), (1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    assert manifest.checkpoints[0].path == "checkpoints/init.ckpt"
    res = analyze(run, metrics=["source_accuracy"], device="cpu", progress=False, plot=False)
    assert not len(res.failures)
    # the last checkpoint is the trained module: dtprobe's number is the module's own
    assert _source_accuracy(res, 2) == pytest.approx(_accuracy(module.model, bundle), abs=1e-12)


class _Images(Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.split.images[i], "labels": self.split.labels[i]}


def test_huggingface_trainer_checkpoints_analyse_with_no_flags(tmp_path, bundle,
                                                               tiny_shapes_params):
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                       "(pip install 'dtprobe[frameworks]')")
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate")
    from dtprobe.integrations.huggingface import ManifestCallback

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = build_model("small_cnn", bundle.num_classes, **ARCH_PARAMS)

        def forward(self, pixel_values, labels=None):
            logits = self.model(pixel_values)
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    torch.manual_seed(0)
    net = Wrapper()
    run = tmp_path / "hf"
    args = transformers.TrainingArguments(
        output_dir=str(run), num_train_epochs=2, per_device_train_batch_size=64,
        save_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        learning_rate=0.1, seed=0)
    cb = ManifestCallback(arch="small_cnn", num_classes=bundle.num_classes,
                          arch_params=ARCH_PARAMS, dataset=_dataset_spec(tiny_shapes_params),
                          training={"epochs": 2})
    transformers.Trainer(model=net, args=args, train_dataset=_Images(bundle.train),
                         callbacks=[cb]).train()
    manifest = cm.read_manifest(run)
    assert [c.epoch for c in manifest.checkpoints] == [0, 1, 2]
    assert manifest.checkpoints[0].step == 0
    assert manifest.checkpoints[-1].path.endswith("model.safetensors")
    res = analyze(run, metrics=["source_accuracy"], device="cpu", progress=False, plot=False)
    assert not len(res.failures)
    assert _source_accuracy(res, 2) == pytest.approx(_accuracy(net.model, bundle), abs=1e-12)
