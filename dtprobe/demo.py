"""``dtprobe demo``: the main job on the embedded default.

Trains a cross-entropy run and a CTC run on ``shapes`` with the same seed, data order and
schedule, analyses both (with CKA between them, and transfer to the embedded downstream
datasets ``digits`` and ``textures``), and writes the trade-off charts and an HTML report.
Re-running reuses finished runs and cached analysis.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import checkpoints_manifest as cm
from dtprobe.training.trainer import TrainConfig, train

# Sized so that both runs train and are analysed on two CPU cores in a few minutes while the
# trade-off is clear: shape accuracy rises as the colour and position probes fall. CTC uses the
# paper's "discriminability" preset: with the "transferability" preset (alpha 0.5, tau1 0.1)
# the small CNN barely learned the shape task in 16 epochs (test accuracy 0.25 vs CE's 0.97).
DEMO_DATA = {"n_train": 4000, "n_test": 1000, "noise": 0.1}
DEMO_ARCH = {"width": 16, "feature_dim": 128}
QUICK_DATA = {"n_train": 600, "n_test": 300}
# Transfer targets that need no download (dtprobe.data): real handwritten digits and procedural
# textures, both rendered to the source's input shape; quick mode shrinks textures.
DEMO_DOWNSTREAM = ["digits", "textures"]
QUICK_DOWNSTREAM = ["digits", "textures:n_train=300,n_test=300"]


def _run_is_complete(run_dir: Path, epochs: int) -> bool:
    try:
        manifest = cm.read_manifest(run_dir)
    except (cm.ManifestError, FileNotFoundError, OSError):
        return False
    return any(c.epoch == epochs for c in manifest.checkpoints)


def _train_or_resume(cfg: TrainConfig) -> None:
    run_dir = Path(cfg.out)
    if _run_is_complete(run_dir, cfg.epochs):
        print(f"{run_dir}: already trained, reusing it")
        return
    cfg.resume = (run_dir / "manifest.json").exists()
    train(cfg)


def run_demo(out: Path, epochs: int = 16, seed: int = 0, device: str = "auto",
             quick: bool = False, fresh: bool = False) -> int:
    """Train CE and CTC runs on ``shapes``, analyse and chart them; returns an exit code."""
    from dtprobe.analysis import analyze
    from dtprobe.plotting import save_all_figures
    from dtprobe.report import write_report
    from dtprobe.results import compare

    if fresh and out.exists():
        shutil.rmtree(out)
    data = dict(QUICK_DATA) if quick else dict(DEMO_DATA)
    if quick:
        epochs = min(epochs, 4)
    save_every = 1 if quick else 2
    common = dict(dataset="shapes", dataset_params=data, arch="small_cnn",
                  arch_params=dict(DEMO_ARCH), epochs=epochs,
                  save_every=save_every, seed=seed, device=device)
    runs = {"ce": TrainConfig(out=str(out / "ce"), objective="ce", **common),
            "ctc": TrainConfig(out=str(out / "ctc"), objective="ctc",
                               ctc={"preset": "discriminability",
                                    "stage_two_epoch": max(1, round(epochs * 2 / 3)),
                                    "nce_k": 1024}, **common)}
    for name, cfg in runs.items():
        print(f"== training {name} ({cfg.epochs} epochs) ==")
        _train_or_resume(cfg)
    failed = 0
    for name, other in (("ce", "ctc"), ("ctc", "ce")):
        print(f"== analysing {name} ==")
        res = analyze(out / name, compare=[out / other], device=device,
                      downstream=QUICK_DOWNSTREAM if quick else DEMO_DOWNSTREAM)
        failed += len(res.failures)
    both = compare([out / "ce", out / "ctc"])
    figures = save_all_figures(both, out / "figures")
    report = write_report(both, out / "report.html")
    summary = both.summary()
    last = summary[summary["metric"].isin(["source_accuracy", "probe_accuracy"])]
    cols = [c for c in ("run", "metric", "task", "first", "best", "best_epoch", "last")
            if c in last.columns]
    print(last[cols].to_string(index=False))
    transfer = both.transfer()
    if not transfer.empty:
        print("\ncross-dataset transfer (linear-probe accuracy per epoch):")
        print(transfer.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        tau = both.score_rank_correlation()
        wide = tau.pivot_table(index=["run", "score"], columns="dataset", values="tau",
                               sort=False)
        print("\nKendall tau of each score vs downstream probe accuracy across epochs:")
        print(wide.to_string(float_format=lambda v: f"{v:+.2f}"))
    print("\nresults:")
    for name in runs:
        print(f"  {out / name / 'analysis' / 'metrics.csv'}")
    print(f"  charts: {out / 'figures'} ({len(figures)} files), "
          f"{out / 'ce' / 'analysis' / 'tradeoff.png'}")
    print(f"  report: {report}")
    return 1 if failed else 0
