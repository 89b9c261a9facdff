"""Cost to training of ``dtprobe train --analyze-every N`` (the live analysis in a background
process at the lowest CPU priority) against the same run without it.

Both runs use the CLI on the embedded ``shapes`` data with the same seed and configuration;
the cost is the mean training epoch time as the trainer logs it (``train_log.csv``,
``epoch_seconds``), and the agreement check is that the background analysis ended with every
checkpoint in ``metrics.csv``. On a machine with idle cores the watcher runs beside the
training; on a saturated one ``nice 19`` gives it what the trainer leaves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from benchmarks import Row, run_python

_CLI = "import sys\nfrom dtprobe.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"


def _train(out: Path, args: list[str]) -> pd.DataFrame:
    run_python(_CLI, "train", "--out", str(out), "--no-progress", "--device", "cpu", *args)
    return pd.read_csv(out / "train_log.csv").set_index("epoch")


def run(quick: bool = False) -> list[Row]:
    if quick:
        epochs = 2
        args = ["--dataset-param", "n_train=200", "--dataset-param", "n_test=100",
                "--dataset-param", "image_size=16", "--arch-param", "width=8",
                "--batch-size", "64"]
    else:
        epochs = 6
        args = ["--dataset-param", "n_train=2000", "--dataset-param", "n_test=400",
                "--batch-size", "128"]
    common = [*args, "--epochs", str(epochs), "--save-every", "1", "--seed", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        plain = _train(Path(tmp) / "plain", common)
        live = _train(Path(tmp) / "live", [*common, "--analyze-every", "1"])
        table = pd.read_csv(Path(tmp) / "live" / "analysis" / "metrics.csv",
                            keep_default_na=False)
    complete = sorted(table["epoch"].unique()) == list(range(epochs + 1))
    size = ("shapes 200 images at 16 px, small_cnn (width 8), batch 64" if quick else
            "shapes 2,000 images at 32 px, small_cnn, batch 128")
    return [Row(name="train --analyze-every 1, epoch cost", sizes=f"{size}, {epochs} epochs",
                ours=float(live["epoch_seconds"].mean()),
                base=float(plain["epoch_seconds"].mean()), kind="factor", goal=None,
                baseline="the same run without live analysis",
                agreement=("every checkpoint analysed in the background" if complete else
                           "the background analysis missed checkpoints"),
                agree_ok=complete, note="live/plain time per training epoch")]
