"""A loss term that stays at its no-information value (the value it takes when the model's
outputs carry no information about the input: every embedding equal, uniform logits) is said
once in the epoch log, and that value is logged per epoch as ``uninformative_<term>``.

The loss is finite there, so no divergence message fires: on the embedded shapes the supervised
contrastive objectives (``supcon``, ``islam_supcon``) sit at it for 11 and 15 epochs
(``ln 255`` and ``ln 300``) while the user sees a "falling" loss in the fourth decimal."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dtprobe.models.registry import build_model as real_build_model
from dtprobe.training import trainer
from dtprobe.training.objectives.contrastive import (
    moco_infonce_loss,
    nt_xent_loss,
    queue_supcon_loss,
    supcon_loss,
)
from dtprobe.training.trainer import (
    STUCK_EPOCHS,
    STUCK_RTOL,
    UNINFORMATIVE_PREFIX,
    Trainer,
    stuck_terms,
    train,
)
from tests.helpers import tiny_config


def _objective(tmp_path, name: str, **params):
    t = Trainer(tiny_config(tmp_path / name, objective=name, objective_params=params))
    t._setup()
    return t.objective


def _equal_rows(n: int, d: int = 16) -> torch.Tensor:
    row = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=1)
    return row.expand(n, d).clone()


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_in_batch_values_are_the_losses_at_equal_embeddings(tmp_path, batch):
    objective = _objective(tmp_path, "supcon_simclr")
    floors = objective.uninformative_losses(batch, 6)
    e = _equal_rows(batch)
    labels = torch.randint(0, 6, (batch,))
    if batch > 1:  # one image has no other view's negatives: both losses are 0 = ln 1
        assert supcon_loss(e, e, labels, 0.1).item() == pytest.approx(floors["supcon"], abs=1e-12)
    assert nt_xent_loss(e, e, 0.1).item() == pytest.approx(floors["simclr"], abs=1e-12)
    assert floors["probe_ce"] == pytest.approx(math.log(6))


@pytest.mark.parametrize("queue", [7, 300])
def test_queue_values_are_the_losses_at_equal_keys(tmp_path, queue):
    objective = _objective(tmp_path, "islam_supcon_ssl", queue_size=queue)
    floors = objective.uninformative_losses(32, 6)
    q, keys = _equal_rows(32), _equal_rows(queue)
    keys.copy_(q[:1].expand(queue, -1))
    labels = torch.randint(0, 6, (32,))
    queue_labels = torch.arange(queue) % 6  # every anchor has a positive in the queue
    # the authors' 1e-5 in |P(i)| + 1e-5 keeps it 1e-5 / |P(i)| relative below ln(queue)
    assert queue_supcon_loss(q, keys, queue_labels, labels, 0.07).item() == pytest.approx(
        floors["supcon"], rel=1e-5)
    assert moco_infonce_loss(q, q, keys, 0.07).item() == pytest.approx(floors["moco"], abs=1e-12)


def test_cross_entropy_value_is_uniform_logits(tmp_path):
    for name in ("ce", "trex"):
        floors = _objective(tmp_path, name).uninformative_losses(16, 5)
        ce = F.cross_entropy(torch.zeros(16, 5, dtype=torch.float64), torch.arange(16) % 5)
        values = [v for k, v in floors.items() if k.endswith("ce")]
        assert values and values == pytest.approx([ce.item()] * len(values), abs=1e-12)


def _log(values: list[float], floor: float = 5.0) -> list[dict[str, float]]:
    return [{"train_supcon": v, f"{UNINFORMATIVE_PREFIX}supcon": floor, "train_ce": 1.0}
            for v in values]


def test_stuck_needs_every_one_of_the_last_epochs_within_tolerance():
    assert stuck_terms(_log([5.0] * (STUCK_EPOCHS - 1))) == {}
    assert stuck_terms(_log([5.0004] * STUCK_EPOCHS)) == {"supcon": 5.0}
    assert stuck_terms(_log([5.0] * STUCK_EPOCHS + [4.9])) == {}  # it left
    assert stuck_terms(_log([4.9] + [4.9999] * STUCK_EPOCHS)) == {"supcon": 5.0}  # it fell back
    assert stuck_terms(_log([5.0, 5.02] + [5.0] * (STUCK_EPOCHS - 2))) == {}
    # CE on the embedded default before it starts to learn: 0.2 % above ln 6, then away
    ce = [{"train_ce": v, f"{UNINFORMATIVE_PREFIX}ce": math.log(6)}
          for v in (1.7956, 1.7866, 1.7487)]
    assert stuck_terms(ce) == {}


def _dead(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.embed[0].bias.fill_(-1e4)  # every feature 0: SupCon's projections all equal
    return model


def test_a_stuck_term_is_said_once_and_its_value_logged(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: _dead(real_build_model(*a, **k)))
    out = train(tiny_config(tmp_path / "run", objective="supcon", epochs=STUCK_EPOCHS + 1))
    said = [ln for ln in capsys.readouterr().out.splitlines() if "no information" in ln]
    assert len(said) == 1 and f"epochs 1-{STUCK_EPOCHS}:" in said[0] and "supcon = " in said[0]
    log = pd.read_csv(out / "train_log.csv")
    # TINY: 240 training images in batches of 64, 64, 64, 48; the epoch's value is weighted
    # by batch size like the term itself
    expected = (3 * 64 * math.log(127) + 48 * math.log(95)) / 240
    assert log[f"{UNINFORMATIVE_PREFIX}supcon"].tolist() == pytest.approx(
        [expected] * len(log), abs=1e-9)
    assert (abs(log["train_supcon"] - expected) < 1e-5).all()


def test_a_learning_run_is_not_flagged(tmp_path, capsys):
    out = train(tiny_config(tmp_path / "run", epochs=STUCK_EPOCHS))
    assert "no information" not in capsys.readouterr().out
    log = pd.read_csv(out / "train_log.csv")
    assert log[f"{UNINFORMATIVE_PREFIX}ce"].tolist() == pytest.approx([math.log(6)] * len(log))
    # still near ln 6 after 3 tiny epochs (1.810, 1.796, 1.782), but moving: not stuck
    assert abs(log["train_ce"].iloc[-1] - math.log(6)) > STUCK_RTOL * math.log(6)


@pytest.mark.parametrize("name", ["label_smoothing", "logit_norm", "cosine_softmax"])
def test_kornblith_values_are_their_losses_at_uniform_output(tmp_path, name):
    objective = _objective(tmp_path, name)
    k = 6
    (term, floor), = objective.uninformative_losses(32, k).items()
    labels = torch.arange(32) % k
    if name == "cosine_softmax":  # a dead embedding (features 0), the head's bias 0
        head = objective._head
        with torch.no_grad():
            head.bias.zero_()
        features = torch.zeros(32, head.in_features)
        loss, terms = objective(features=features, labels=labels)
    else:  # logits along (1, ..., 1): uniform, also after logit normalisation
        loss, terms = objective(logits=torch.full((32, k), 0.3, dtype=torch.float64),
                                labels=labels)
    assert terms[term] == pytest.approx(floor, abs=1e-6)
    assert loss.item() == pytest.approx(floor, abs=1e-6)


@pytest.mark.parametrize(("name", "params"), [
    ("sigmoid", {}), ("squared_error", {}),
    ("squared_error", {"kappa": 9.0, "M": 60.0, "scale": 10.0})])
def test_kornblith_values_are_their_best_input_blind_losses(tmp_path, name, params):
    """The value is the minimum over logits shared by every image (balanced labels): found here
    by L-BFGS in float64 from a random start, so the closed form is checked, not restated."""
    objective = _objective(tmp_path, name, **params)
    k = 6
    (term, floor), = objective.uninformative_losses(60, k).items()
    labels = torch.arange(60) % k
    z = torch.randn(1, k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-14, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss, _ = objective(logits=z.expand(60, k), labels=labels)
        loss.backward()
        return loss

    opt.step(closure)
    loss, terms = objective(logits=z.detach().expand(60, k), labels=labels)
    assert terms[term] == pytest.approx(floor, rel=1e-9)
