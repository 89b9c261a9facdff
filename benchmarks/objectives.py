"""Per-epoch training cost of every registered objective relative to softmax cross-entropy.

One process, one configuration (embedded ``shapes``, ``small_cnn``), the same data order and
augmentation for every objective. Epochs are timed round-robin (CE, objective A, objective B,
..., then again) so that load on a shared machine hits every objective alike; each objective's
cost is the median of its epoch times, reported as a factor of CE's. Two-view objectives
(SupCon, SimCLR joints) forward a second view, so about 2x is expected; t-ReX adds a projector
(hidden width 2048 by default, as in the paper); CTC's stage 2 (its costly part) is timed with
``stage_two_epoch = 0``.

References: Kornblith et al. 2021; Islam et al. 2021; Sariyildiz et al. 2023; Cui et al. 2022.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time

import torch

from benchmarks import Row

#: Parameters that keep objectives runnable on the tiny benchmark setting (recorded in the row).
PARAMS = {"ctc": {"stage_two_epoch": 0, "nce_k": 4096}}


def run(quick: bool = False) -> list[Row]:
    from dtprobe.training.objectives import available_objectives
    from dtprobe.training.trainer import TrainConfig, Trainer

    if quick:
        data = {"n_train": 128, "n_test": 32, "image_size": 16}
        arch, batch, rounds = {"width": 4, "feature_dim": 16}, 32, 2
        names = ["ce", "label_smoothing", "cosine_softmax", "supcon", "trex_star", "ctc"]
    else:
        data = {"n_train": 1000, "n_test": 100, "image_size": 32}
        arch, batch, rounds = {"width": 16}, 128, 3
        names = list(available_objectives())
    size = (f"shapes {data['n_train']} images at {data['image_size']} px, small_cnn "
            f"(width {arch['width']}), batch {batch}, median of {rounds} epochs")
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = TrainConfig(out=f"{tmp}/{name}", dataset_params=dict(data),
                              arch_params=dict(arch), batch_size=batch, epochs=rounds + 1,
                              device="cpu", progress=False, objective=name,
                              objective_params=dict(PARAMS.get(name, {})))
            trainer = Trainer(cfg)
            trainer._setup()
            trainer._run_epoch(1)  # warm-up (allocations, CTC's snapshot and bank refresh)
            trainers[name] = trainer
        times: dict[str, list[float]] = {n: [] for n in names}
        losses_ok = {n: True for n in names}
        for epoch in range(2, rounds + 2):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                out = trainer._run_epoch(epoch)
                times[name].append(time.perf_counter() - t0)
                losses_ok[name] &= math.isfinite(out["train_loss"])
    base = statistics.median(times["ce"])
    rows = []
    for name in names:
        if name == "ce":
            continue
        views = trainers[name].objective.views
        rows.append(Row(
            name=f"train --objective {name} epoch cost", sizes=size,
            ours=statistics.median(times[name]), base=base, kind="factor", goal=None,
            baseline="CE, same data, order and schedule, timed round-robin",
            agreement="finite losses" if losses_ok[name] else "non-finite loss",
            agree_ok=losses_ok[name],
            note=(f"{views} views" + (f"; params {PARAMS[name]}" if name in PARAMS else "")
                  + f"; torch threads {torch.get_num_threads()}")))
    return rows
