"""Framework checkpoint layouts and epoch conventions (dtprobe.checkpoints.layouts), on small
files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtprobe import checkpoints as ck
from dtprobe.checkpoints import layouts
from dtprobe.errors import CheckpointError, ConfigError

W = {"w": torch.zeros(2)}


def _touch(run: Path, *names: str) -> None:
    for name in names:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"")


def test_lightning_versions_below_the_run_dir_with_records_from_the_files(tmp_path):
    for version, epoch, step in ((0, 0, 10), (0, 1, 20), (1, 2, 30)):  # resumed in version_1
        path = (tmp_path / f"lightning_logs/version_{version}/checkpoints"
                / f"epoch={epoch}-val_acc=0.5.ckpt")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": W, "epoch": epoch, "global_step": step}, path)
    _touch(tmp_path, "lightning_logs/version_0/checkpoints/last.ckpt")
    series = ck.infer_checkpoint_series(tmp_path)
    assert [(c.epoch, c.step, c.source_epoch, c.epoch_basis) for c in series] == [
        (1, 10, 0, "metadata"), (2, 20, 1, "metadata"), (3, 30, 2, "metadata")]
    assert series.layouts == ["lightning"] and "e+1" in series.epoch_note
    by_name = ck.infer_checkpoint_series(tmp_path, epoch_from="name")
    assert [c.epoch for c in by_name] == [1, 2, 3] and by_name[0].epoch_basis == "name"
    assert [c.epoch for c in ck.infer_checkpoint_series(tmp_path, epoch_from="order")] == [
        1, 2, 3]


def test_hf_checkpoint_folders_hold_steps_and_trainer_state_holds_epochs(tmp_path):
    for step, epoch in ((50, 1.0), (100, 2.0)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file(W, folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch,
                                                               "global_step": step}))
    series = ck.infer_checkpoint_series(tmp_path)
    assert [(c.epoch, c.step) for c in series] == [(1, 50), (2, 100)]
    assert series.layouts == ["hf_trainer"]
    with pytest.raises(CheckpointError, match="--epoch-from order"):
        ck.infer_checkpoint_series(tmp_path, epoch_from="name")  # the name holds a step
    # Saved by steps (fractional epochs): numbered in order, the step kept.
    (tmp_path / "checkpoint-50" / "trainer_state.json").write_text(
        json.dumps({"epoch": 0.5, "global_step": 50}))
    series = ck.infer_checkpoint_series(tmp_path)
    assert [(c.epoch, c.step, c.epoch_basis) for c in series] == [(1, 50, "order"),
                                                                 (2, 100, "order")]
    assert "position in the series" in series.epoch_note


def test_accelerate_save_indices_are_not_epochs(tmp_path):
    for index in (0, 1, 10):
        folder = tmp_path / "checkpoints" / f"checkpoint_{index}"
        folder.mkdir(parents=True)
        save_file(W, folder / "model.safetensors")
        _touch(folder, "optimizer.bin", "random_states_0.pkl")
    series = ck.infer_checkpoint_series(tmp_path)
    assert [(c.epoch, c.relpath) for c in series] == [
        (1, "checkpoints/checkpoint_0/model.safetensors"),
        (2, "checkpoints/checkpoint_1/model.safetensors"),
        (3, "checkpoints/checkpoint_10/model.safetensors")]
    assert series.layouts == ["accelerate"]


def test_timm_experiment_folder_counts_from_zero(tmp_path):
    exp = "output/train/20260101-000000-resnet18-224"
    _touch(tmp_path, f"{exp}/checkpoint-0.pth.tar", f"{exp}/checkpoint-1.pth.tar",
           f"{exp}/last.pth.tar", f"{exp}/model_best.pth.tar", f"{exp}/args.yaml")
    series = ck.infer_checkpoint_series(tmp_path)
    assert [c.epoch for c in series] == [1, 2] and series.layouts == ["timm"]
    _touch(tmp_path, "output/train/other-experiment/checkpoint-0.pth.tar")
    with pytest.raises(CheckpointError, match="several runs below it"):
        ck.infer_checkpoint_series(tmp_path)


@pytest.mark.parametrize("name, epoch, step", [
    ("epoch=3-val_acc=0.71.ckpt", 4, None),              # Lightning, metric in the name
    ("epoch=3-step=120-val_loss=0.25.ckpt", 4, 120),
    ("epoch_003.ckpt", 3, None),
    ("weights-epoch7.pt", 7, None),
    ("run_ep_12_step_400.pth", 12, 400),
])
def test_names_with_metric_suffixes_and_padding(tmp_path, name, epoch, step):
    _touch(tmp_path, name)
    [c] = ck.infer_checkpoint_series(tmp_path)
    assert (c.epoch, c.step) == (epoch, step)


def test_the_hint_for_unknown_names_is_a_pattern_that_works(tmp_path):
    _touch(tmp_path, "weights/snap-3.pt", "weights/snap-4.pt")
    with pytest.raises(CheckpointError) as info:
        ck.infer_checkpoint_series(tmp_path)
    msg = str(info.value)
    assert "--pattern 'weights/snap-{epoch}.pt'" in msg and "layouts" in msg
    assert [c.epoch for c in ck.infer_checkpoint_series(tmp_path, "weights/snap-{epoch}.pt")] \
        == [3, 4]


def test_bad_epoch_source_is_a_config_error(tmp_path):
    _touch(tmp_path, "ckpt_epoch_1.pth")
    with pytest.raises(ConfigError, match="--epoch-from"):
        ck.infer_checkpoint_series(tmp_path, epoch_from="guess")


def test_every_layout_is_documented():
    assert set(layouts.LAYOUTS) >= {"lightning", "hf_trainer", "accelerate", "timm",
                                    "torchvision", "ctc", "dtprobe", "safetensors", "generic"}
    for layout in layouts.LAYOUTS.values():
        assert layout.framework and layout.example and layout.number in ("epoch", "step",
                                                                          "index")
