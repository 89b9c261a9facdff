"""Epoch cost of ``dtprobe train --ctc`` against plain cross-entropy, same configuration.

Contrastive temporal coding (Cui et al. 2022) adds, in stage 1, a projector and an
instance-discrimination softmax over a memory bank; in stage 2, a forward pass of the frozen
stage-1 snapshot per batch, two projectors, two banks and a binary NCE over K negatives from
other classes (plus, once when stage 2 starts, a pass over the training set to refresh the
banks). Both runs use the CLI on the embedded ``shapes`` data with the same seed, data
order, optimiser and schedule; the cost is each epoch's wall time as the trainer logs it
(``train_log.csv``, ``epoch_seconds``: the epoch's training steps plus its test-accuracy
pass), averaged over the epochs of each stage and compared with the CE run's same epochs.

Reference: Cui, Q. et al. (2022). Discriminability-transferability trade-off: an
information-theoretic perspective. ECCV 2022.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

import checkpoints_manifest as cm
from benchmarks import Row, run_python

_CLI = "import sys\nfrom dtprobe.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
_OBJECTIVE_FIELDS = {"objective", "ctc", "objective_config", "objective_params",
                     "analysed_features", "views"}


def _train(out: Path, args: list[str]) -> pd.DataFrame:
    run_python(_CLI, "train", "--out", str(out), "--no-progress", "--device", "cpu", *args)
    return pd.read_csv(out / "train_log.csv").set_index("epoch")


def run(quick: bool = False) -> list[Row]:
    if quick:
        epochs, stage_two = 2, 1
        args = ["--dataset-param", "n_train=200", "--dataset-param", "n_test=100",
                "--dataset-param", "image_size=16", "--arch-param", "width=8",
                "--batch-size", "64"]
    else:
        epochs, stage_two = 4, 2
        args = ["--dataset-param", "n_train=1000", "--dataset-param", "n_test=200",
                "--batch-size", "128"]
    common = [*args, "--epochs", str(epochs), "--save-every", str(epochs), "--seed", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        ce = _train(Path(tmp) / "ce", common)
        ctc = _train(Path(tmp) / "ctc", [*common, "--ctc", "--stage-two-epoch", str(stage_two)])
        records = [cm.read_manifest(Path(tmp) / name).training for name in ("ce", "ctc")]
    same = {k: v for k, v in records[0].items() if k not in _OBJECTIVE_FIELDS} == \
        {k: v for k, v in records[1].items() if k not in _OBJECTIVE_FIELDS}
    k_eff = (records[1].get("objective_config") or {}).get("nce_k_effective", "?")
    finite = bool(ce["train_loss"].notna().all() and ctc["train_loss"].notna().all())
    size = ("shapes 200 images at 16 px, small_cnn (width 8), batch 64" if quick else
            "shapes 1,000 images at 32 px, small_cnn, batch 128")
    rows = []
    for stage, first, last in (("stage 1", 1, stage_two), ("stage 2", stage_two + 1, epochs)):
        span = list(range(first, last + 1))
        ours = float(ctc.loc[span, "epoch_seconds"].mean())
        base = float(ce.loc[span, "epoch_seconds"].mean())
        rows.append(Row(
            name=f"train --ctc epoch cost, {stage}", sizes=f"{size}, epochs {first}-{last}",
            ours=ours, base=base, kind="factor", goal=None, baseline="CE, same epochs",
            agreement=("same config apart from the objective; finite losses"
                       if same and finite else "configs or losses differ"),
            agree_ok=same and finite,
            note=(f"CTC/CE time per epoch; NCE negatives K = {k_eff} (the paper's 16384, "
                  "clipped to the smallest other-class pool)" if stage == "stage 2" else
                  "CTC/CE time per epoch")))
    return rows
