"""Command line: ``dtprobe train | analyze | plot | report | demo | list``.

User errors (:class:`dtprobe.errors.DtprobeError`, manifest errors) print one line and exit 2;
``--debug`` shows the traceback instead. Exit statuses: 0 success, 1 the analysis finished but
some checkpoints failed (each reason printed and in ``analysis/failures.csv``), 2 user error
(bad option or file, run busy with ``--no-wait``), 130 interrupted (completed work is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dtprobe import __version__

EXIT_USAGE = 2
EXIT_PARTIAL = 1  # analysis finished but some checkpoints failed


def _parse_kv(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["n_train=600", "noise=0.1"]`` -> typed dict (JSON literals where they parse)."""
    from dtprobe.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser, default_dataset: str | None) -> None:
    p.add_argument("--dataset", default=default_dataset,
                   help="dataset name (see `dtprobe list`)" +
                   (f"; default {default_dataset}" if default_dataset else ""))
    p.add_argument("--data-root", default=None, help="root folder of a real dataset on disk")
    p.add_argument("--download", action="store_true",
                   help="allow downloading a real dataset into --data-root")
    p.add_argument("--dataset-param", action="append", metavar="KEY=VALUE",
                   help="dataset parameter, repeatable (e.g. n_train=2000)")


def _dataset_params(args: argparse.Namespace) -> dict[str, Any] | None:
    params = _parse_kv(args.dataset_param, "--dataset-param")
    if args.data_root:
        params["root"] = args.data_root
    if args.download:
        params["download"] = True
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dtprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run and write checkpoints + manifest")
    _add_data_args(t, "shapes")
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--arch", default="small_cnn")
    t.add_argument("--arch-param", action="append", metavar="KEY=VALUE",
                   help="architecture parameter, repeatable (e.g. cifar_stem=true)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--warmup-epochs", type=int, default=1)
    t.add_argument("--augment", default="auto", choices=["auto", "none", "crop", "crop-flip"])
    t.add_argument("--save-every", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="save and exit after this epoch (continue later with --resume)")
    t.add_argument("--no-progress", action="store_true")
    ctc = t.add_argument_group("CTC (contrastive temporal coding, Cui et al. 2022)")
    ctc.add_argument("--ctc", action="store_true", help="train with CTC instead of plain CE")
    ctc.add_argument("--ctc-preset", default="transferability",
                     choices=["transferability", "discriminability"])
    for flag, typ, hlp in [
        ("--stage-two-epoch", int, "last epoch of stage 1 (S); default 2/3 of --epochs"),
        ("--alpha", float, "weight of the stage-1 instance-discrimination loss"),
        ("--tau1", float, "stage-1 temperature"), ("--m1", float, "stage-1 bank momentum"),
        ("--beta", float, "weight of the stage-2 NCE loss"),
        ("--tau2", float, "stage-2 temperature"), ("--m2", float, "stage-2 bank momentum"),
        ("--nce-k", int, "stage-2 negatives per positive (paper 16384)"),
        ("--proj-dim", int, "projection dimension (paper 128)")]:
        ctc.add_argument(flag, type=typ, default=None, help=hlp)
    ctc.add_argument("--freeze-stage1-projector", action="store_true",
                     help="reproduce the reference code, whose stage-1 projector was never trained")

    a = sub.add_parser("analyze", help="analyse every checkpoint of a run")
    a.add_argument("run_dir")
    a.add_argument("--metrics", nargs="+", default=None,
                   help="metric names (see `dtprobe list`), 'default' or 'all'")
    a.add_argument("--compare", nargs="+", default=[], metavar="OTHER_RUN",
                   help="other runs for CKA between runs at matching epochs")
    a.add_argument("--layers", nargs="+", default=[], help="module names for layer-wise CKA")
    a.add_argument("--downstream", nargs="+", default=[], metavar="SPEC",
                   help="transfer datasets DATASET[:KEY=VALUE,...], e.g. digits textures "
                        "cinic10:root=/data/cinic10 imagefolder:root=/data/pets,name=pets; "
                        "probes and transferability scores per checkpoint on each")
    a.add_argument("--downstream-metrics", nargs="+", default=None, metavar="METRIC",
                   help="metrics computed on each downstream dataset (default: probe_accuracy "
                        "knn_accuracy logme h_score transrate gbc leep nce)")
    a.add_argument("--device", default="auto")
    a.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="images per forward pass during extraction (default: auto)")
    a.add_argument("--arch", default=None, help="architecture, for runs without a manifest")
    a.add_argument("--arch-param", action="append", metavar="KEY=VALUE")
    a.add_argument("--num-classes", type=int, default=None)
    a.add_argument("--pattern", default=None,
                   help="checkpoint file glob with {epoch}, e.g. 'snap_{epoch}.pt'")
    a.add_argument("--no-cache", action="store_true", help="ignore cached features")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--no-plot", action="store_true", help="do not write analysis/tradeoff.png")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-wait", action="store_true",
                   help="if another analysis of this run is in progress, stop with 'run is busy' "
                        "instead of waiting for it")
    a.add_argument("--follow-symlinks", action="store_true",
                   help="accept checkpoints reached through symbolic links that lead out of the "
                        "run directory (e.g. to scratch storage); refused by default")
    _add_data_args(a, None)

    pl = sub.add_parser("plot", help="write every chart the analysed metrics allow")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", required=True)
    pl.add_argument("--format", nargs="+", default=["png"], choices=["png", "svg", "pdf"])

    r = sub.add_parser("report", help="write a self-contained HTML report")
    r.add_argument("runs", nargs="+")
    r.add_argument("-o", "--output", default="report.html")

    d = sub.add_parser("demo", help="CE and CTC runs on the embedded data, analysed and charted")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--quick", action="store_true", help="tiny data and few epochs (smoke test)")
    d.add_argument("--fresh", action="store_true", help="delete earlier demo runs first")

    sub.add_parser("list", help="list architectures, datasets and metrics")
    return parser


def _train_config(args: argparse.Namespace):
    from dtprobe.training.trainer import TrainConfig

    ctc: dict[str, Any] = {"preset": args.ctc_preset}
    for name in ("stage_two_epoch", "alpha", "tau1", "m1", "beta", "tau2", "m2", "nce_k",
                 "proj_dim"):
        if getattr(args, name) is not None:
            ctc[name] = getattr(args, name)
    if args.freeze_stage1_projector:
        ctc["freeze_stage1_projector"] = True
    if args.ctc and "stage_two_epoch" not in ctc:
        ctc["stage_two_epoch"] = max(1, round(args.epochs * 2 / 3))
    return TrainConfig(
        out=args.out, dataset=args.dataset, dataset_params=_dataset_params(args) or {},
        arch=args.arch, arch_params=_parse_kv(args.arch_param, "--arch-param"),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, augment=args.augment,
        save_every=args.save_every, seed=args.seed, device=args.device,
        objective="ctc" if args.ctc else "ce", ctc=ctc if args.ctc else {},
        resume=args.resume, stop_after=args.stop_after,
        progress=not args.no_progress)


SUMMARY_METRICS = ("source_accuracy", "probe_accuracy", "class_separation", "cka_to_final")


def _print_summary(results) -> None:
    import pandas as pd

    if results.table.empty:
        print("no metrics computed")
        return
    wide = results.wide()
    columns = [c for c in wide.columns if c.split("[")[0] in SUMMARY_METRICS]
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.precision", 3):
        print(wide[columns].to_string())


def cmd_train(args: argparse.Namespace) -> int:
    from dtprobe.training.trainer import train

    out = train(_train_config(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"run written to {out} (manifest: {out / 'manifest.json'})")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dtprobe.analysis import analyze

    results = analyze(args.run_dir, metrics=args.metrics, device=args.device,
                      arch=args.arch, num_classes=args.num_classes,
                      arch_params=_parse_kv(args.arch_param, "--arch-param") or None,
                      dataset=args.dataset, dataset_params=_dataset_params(args) or None,
                      pattern=args.pattern, compare=args.compare, layers=args.layers,
                      batch_size=args.batch_size, use_cache=not args.no_cache,
                      progress=not args.no_progress, plot=not args.no_plot, seed=args.seed,
                      wait=not args.no_wait, follow_symlinks=args.follow_symlinks,
                      downstream=args.downstream, downstream_metrics=args.downstream_metrics)
    if results is None:  # a torchrun rank > 0: rank 0 merged and reports
        return 0
    _print_summary(results)
    out = Path(args.run_dir) / "analysis"
    stats = getattr(results, "stats", None)
    if stats is not None:
        print(stats.summary())
    chart = "" if args.no_plot else f"  chart: {out / 'tradeoff.png'}"
    print(f"results: {out / 'metrics.csv'}{chart}")
    lost = getattr(stats, "downstream_failed", 0)
    if lost:
        print(f"dtprobe analyze: {lost} downstream dataset(s) could not be loaded (reason above "
              f"and in {out / 'failures.csv'}); the source and the other datasets were analysed",
              file=sys.stderr)
    if len(results.failures) > lost:
        total = stats.checkpoints if stats is not None else "?"
        print(f"dtprobe analyze: {len(results.failures) - lost} of {total} checkpoint(s) failed "
              f"(each reason above and in {out / 'failures.csv'}); the others were analysed",
              file=sys.stderr)
    return EXIT_PARTIAL if len(results.failures) else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dtprobe.plotting import save_all_figures
    from dtprobe.results import load_results

    paths = save_all_figures(load_results(args.runs), args.out, formats=tuple(args.format))
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dtprobe.report import write_report
    from dtprobe.results import load_results

    out = write_report(load_results(args.runs), args.output)
    print(f"report written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dtprobe.demo import run_demo

    return run_demo(out=Path(args.out), epochs=args.epochs, seed=args.seed, device=args.device,
                    quick=args.quick, fresh=args.fresh)


def cmd_list(args: argparse.Namespace) -> int:
    from dtprobe.data import available_datasets
    from dtprobe.metrics.registry import available_metrics
    from dtprobe.models import available_archs

    print("architectures:")
    for name, spec in available_archs().items():
        print(f"  {name:24s} {spec.description.splitlines()[0] if spec.description else ''}")
    print("datasets:")
    for name in available_datasets():
        print(f"  {name}")
    print("metrics (* = default):")
    for name, spec in available_metrics().items():
        first = spec.description.splitlines()[0] if spec.description else ""
        print(f"  {'*' if spec.default else ' '} {name:22s} {first}")
    return 0


COMMANDS = {"train": cmd_train, "analyze": cmd_analyze, "plot": cmd_plot, "report": cmd_report,
            "demo": cmd_demo, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from checkpoints_manifest import ManifestError
    from dtprobe.errors import DtprobeError

    start = time.perf_counter()
    try:
        code = COMMANDS[args.command](args)
    except (DtprobeError, ManifestError) as exc:
        if args.debug:
            raise
        print(f"dtprobe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; completed work is saved (re-run to continue)", file=sys.stderr)
        return 130
    if args.command in ("train", "analyze", "demo") and os.environ.get("RANK", "0") == "0":
        print(f"done in {time.perf_counter() - start:.1f}s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
