"""A run whose penultimate features die (every test image's features exactly 0: a dead ReLU
embedding, the absorbing state cosine softmax drives ``small_cnn`` into at the authors' tau) is
said once in the epoch log and recorded per epoch in ``train_log.csv``; the loss stays finite,
so no divergence message would otherwise tell the user."""

from __future__ import annotations

import pandas as pd
import torch

from dtprobe.models.registry import build_model as real_build_model
from dtprobe.training import trainer
from dtprobe.training.trainer import DEAD_FEATURES_COLUMN, evaluate_accuracy, train
from tests.helpers import tiny_config


def _dead(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.embed[0].bias.fill_(-1e4)  # every pre-activation negative: ReLU outputs 0
    return model


def test_evaluate_counts_images_with_all_zero_features():
    torch.manual_seed(0)
    model = real_build_model("small_cnn", 3, width=4, feature_dim=8, in_channels=3)
    images, labels = torch.rand(10, 3, 16, 16), torch.randint(0, 3, (10,))
    stats: dict[str, float] = {}
    evaluate_accuracy(model, images, labels, torch.device("cpu"), head=model.fc,
                      feature_stats=stats)
    assert stats[DEAD_FEATURES_COLUMN] < 0.5
    _dead(model)
    evaluate_accuracy(model, images, labels, torch.device("cpu"), batch_size=4, head=model.fc,
                      feature_stats=stats)
    assert stats[DEAD_FEATURES_COLUMN] == 1.0


def test_a_dead_embedding_is_said_once_and_logged(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: _dead(real_build_model(*a, **k)))
    out = train(tiny_config(tmp_path / "run", epochs=3))
    said = [ln for ln in capsys.readouterr().out.splitlines() if "dead ReLU embedding" in ln]
    assert len(said) == 1 and "at epoch 1 " in said[0] and "--lr" in said[0]
    log = pd.read_csv(out / "train_log.csv")
    assert log[DEAD_FEATURES_COLUMN].tolist() == [1.0, 1.0, 1.0]


def test_a_living_embedding_is_not_flagged(tmp_path, capsys):
    out = train(tiny_config(tmp_path / "run"))
    assert "dead ReLU embedding" not in capsys.readouterr().out
    assert (pd.read_csv(out / "train_log.csv")[DEAD_FEATURES_COLUMN] < 1.0).all()
