"""Analyse a checkpoint series written by some other training script.

Any script that saves ``{"model": model.state_dict(), "epoch": e}`` as ``ckpt_epoch_{e}.pth``
(the CTC paper's format) or Lightning's ``epoch={e}-step={s}.ckpt`` can be analysed without a
manifest: dtprobe infers the series from the file names and takes the architecture and data from
arguments.

This example first writes such a run itself (a few epochs of a plain PyTorch loop on the embedded
``shapes`` data with torchvision's resnet18), then analyses it:

    python examples/analyze_external_run.py --out runs/external
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import dtprobe
from dtprobe.data import load_dataset

DATA = {"n_train": 1200, "n_test": 400}


def write_external_run(out: Path, epochs: int = 4, seed: int = 0) -> None:
    """A training loop that knows nothing about dtprobe, saving one file per epoch."""
    torch.manual_seed(seed)
    data = load_dataset("shapes", **DATA)
    model = torchvision.models.resnet18(num_classes=data.num_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR-style stem for 32 px
    model.maxpool = torch.nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(epochs + 1):
        if epoch > 0:
            model.train()
            for idx in torch.randperm(len(data.train)).split(128):
                loss = F.cross_entropy(model(data.train.images[idx]), data.train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.save({"model": model.state_dict(), "epoch": epoch}, out / f"ckpt_epoch_{epoch}.pth")
        print(f"saved {out / f'ckpt_epoch_{epoch}.pth'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/external")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    if not any(out.glob("ckpt_epoch_*.pth")):
        write_external_run(out, args.epochs)
    results = dtprobe.analyze(out, arch="resnet18", num_classes=6,
                              arch_params={"cifar_stem": True}, dataset="shapes",
                              dataset_params=DATA)
    print(results.wide().round(3).to_string())
    print(f"table: {out / 'analysis' / 'metrics.csv'}")


if __name__ == "__main__":
    main()
