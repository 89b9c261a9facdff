"""Command line: dtprobe train | analyze | plot | report | demo | list.

User errors (:class:`dtprobe.errors.DtprobeError`, manifest errors, bad options, unwritable
output paths) print one line and exit 2; ``--debug`` shows the traceback instead. Exit
statuses: 0 success, 1 the analysis finished but some checkpoints failed (each reason printed
and in ``analysis/failures.csv``), 2 user error (bad option or file, run busy with
``--no-wait``), 130 interrupted (completed work is kept).

Every option is checked before any work starts: numbers by the argparse ``type`` functions
below, names of datasets, architectures and metrics by :mod:`dtprobe.names` (before torch is
imported) and output paths by probing that their folder is writable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from dtprobe import __version__

EXIT_USAGE = 2
EXIT_PARTIAL = 1  # analysis finished but some checkpoints failed

DESCRIPTION = """\
dtprobe measures the discriminability-transferability trade-off over the checkpoints of a
training run (Kornblith et al. 2021; Cui et al. 2022): per checkpoint it extracts penultimate
features and computes source accuracy, class separation, neural collapse, downstream linear
probes, transferability scores, CKA over time and information estimates.

typical use:
  dtprobe demo                          CE and CTC runs on embedded data, charts and a report
  dtprobe train --out runs/ce           train a run (add --ctc for contrastive temporal coding)
  dtprobe analyze runs/ce               analyse every checkpoint -> runs/ce/analysis/
  dtprobe report runs/ce runs/ctc       one self-contained HTML report comparing runs"""

EPILOG = """\
exit status: 0 success; 1 the analysis finished but some checkpoints failed (reasons printed
and in analysis/failures.csv); 2 bad option, name, file or output path (one line on stderr;
--debug shows the traceback); 130 interrupted (completed work is kept)."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # flags (False) and unset options (None, []) have no default worth printing
        if action.default in (None, False, [], argparse.SUPPRESS) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=90)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dtprobe train: error: argument --epochs: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------------ numeric option types
def _number(text: str, kind: type, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return int(_number(text, int, "an integer >= 1", lambda v: v >= 1))


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return int(_number(text, int, "an integer >= 0", lambda v: v >= 0))


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, temperatures)."""
    return float(_number(text, float, "a finite number > 0", lambda v: v > 0))


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (loss weights, weight decay)."""
    return float(_number(text, float, "a finite number >= 0", lambda v: v >= 0))


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1) (SGD and memory-bank momentum)."""
    return float(_number(text, float, "a number in [0, 1)", lambda v: 0 <= v < 1))


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") \
            from None


def _num_classes(text: str) -> int:
    return int(_number(text, int, "an integer >= 2", lambda v: v >= 2))


# ------------------------------------------------------------------ output paths
def check_output_dir(path: str | os.PathLike[str], option: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` is, or can be created as, a writable folder.

    Nothing is created: the nearest existing ancestor must be a folder in which a file can be
    written (probed with a temporary file that is removed at once), so that a bad ``--out``
    is reported before minutes of data loading or training.
    """
    from dtprobe.errors import ConfigError

    target = Path(path)
    probe = target
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{option} {target}: {probe} is a broken symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {target}: {probe} is not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".dtprobe-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {target}: cannot write in {probe} "
                          f"({exc.strerror or exc}); choose a writable path") from None


def check_output_file(path: str | os.PathLike[str], option: str) -> None:
    """Like :func:`check_output_dir` for a file to be written at ``path``."""
    from dtprobe.errors import ConfigError

    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {target}: is a folder; give a file name such as "
                          f"{target / 'report.html'}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{option} {target}: the file exists and is not writable")
    try:
        check_output_dir(target.parent, option)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"{option} {target.parent}:", f"{option} {target}:",
                                           1)) from None


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


def _add_data_args(p: argparse.ArgumentParser, default_dataset: str | None) -> None:
    p.add_argument("--dataset", default=default_dataset,
                   help="dataset name (see `dtprobe list`)" +
                   ("" if default_dataset else "; default: the one in the run's manifest"))
    p.add_argument("--data-root", default=None,
                   help="root folder of a real dataset on disk (cifar10, cinic10, imagefolder ...)")
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
    common = dict(formatter_class=_Formatter)
    parser = _Parser(prog="dtprobe", description=DESCRIPTION, epilog=EPILOG, **common)
    parser.add_argument("--version", action="version", version=f"dtprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a run and write checkpoints + manifest", **common,
        description=_wrap("Train a network with cross-entropy (default) or CTC and save a "
                          "checkpoint every --save-every epochs, plus OUT/manifest.json "
                          "describing the series."))
    _add_data_args(t, "shapes")
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--arch", default="small_cnn", help="architecture (see `dtprobe list`)")
    t.add_argument("--arch-param", action="append", metavar="KEY=VALUE",
                   help="architecture parameter, repeatable (e.g. cifar_stem=true)")
    t.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    t.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per optimiser step (split over ranks under torchrun)")
    t.add_argument("--lr", type=positive_float, default=0.05, help="peak SGD learning rate")
    t.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=nonnegative_float, default=5e-4,
                   help="SGD weight decay")
    t.add_argument("--warmup-epochs", type=nonnegative_int, default=1,
                   help="epochs of linear learning-rate warm-up before the cosine decay")
    t.add_argument("--augment", default="auto", choices=["auto", "none", "crop", "crop-flip"],
                   help="training augmentation; auto = none for shapes/digits, else crop-flip")
    t.add_argument("--save-every", type=positive_int, default=2,
                   help="save a checkpoint every N epochs (epoch 0 and the last are always saved)")
    t.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of initialisation, data order and augmentation")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--stop-after", type=positive_int, default=None, metavar="EPOCH",
                   help="save and exit after this epoch (continue later with --resume)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    ctc = t.add_argument_group("CTC (contrastive temporal coding, Cui et al. 2022); unset "
                               "values come from --ctc-preset")
    ctc.add_argument("--ctc", action="store_true", help="train with CTC instead of plain CE")
    ctc.add_argument("--ctc-preset", default="transferability",
                     choices=["transferability", "discriminability"],
                     help="the paper's README presets of alpha, tau1, m1, beta, tau2, m2")
    for flag, typ, hlp in [
        ("--stage-two-epoch", nonnegative_int,
         "last epoch of stage 1 (S); default: 2/3 of --epochs"),
        ("--alpha", nonnegative_float, "weight of the stage-1 instance-discrimination loss"),
        ("--tau1", positive_float, "stage-1 temperature"),
        ("--m1", unit_interval, "stage-1 bank momentum, in [0, 1)"),
        ("--beta", nonnegative_float, "weight of the stage-2 NCE loss"),
        ("--tau2", positive_float, "stage-2 temperature"),
        ("--m2", unit_interval, "stage-2 bank momentum, in [0, 1)"),
        ("--nce-k", positive_int, "stage-2 negatives per positive (paper 16384)"),
        ("--proj-dim", positive_int, "projection dimension (paper 128)")]:
        ctc.add_argument(flag, type=typ, default=None, help=hlp)
    ctc.add_argument("--freeze-stage1-projector", action="store_true",
                     help="reproduce the reference code, whose stage-1 projector was never trained")

    a = sub.add_parser(
        "analyze", help="analyse every checkpoint of a run", **common,
        description=_wrap("For every checkpoint of RUN_DIR (listed in RUN_DIR/manifest.json, or "
                    "found by file name): rebuild the model, extract penultimate features of the "
                    "source test set (cached in RUN_DIR/analysis/features/) and compute the "
                    "selected metrics: source accuracy, class separation, neural collapse, "
                    "RankMe, linear-probe accuracy on the downstream tasks, information "
                    "estimates, linear CKA to the final and previous epoch (and to --compare "
                    "runs). Writes RUN_DIR/analysis/metrics.csv (the tidy table), "
                    "cka_matrix.csv, failures.csv when a checkpoint fails, and tradeoff.png."))
    a.add_argument("run_dir", help="run directory (with manifest.json or checkpoint files)")
    a.add_argument("--metrics", nargs="+", default=None,
                   help="metric names (see `dtprobe list`), 'default' or 'all'; "
                        "default: the starred ones")
    a.add_argument("--compare", nargs="+", default=[], metavar="OTHER_RUN",
                   help="other runs for CKA between runs at matching epochs")
    a.add_argument("--layers", nargs="+", default=[],
                   help="module names for layer-wise CKA (e.g. layer3 layer4)")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="images per forward pass during extraction")
    a.add_argument("--arch", default=None, help="architecture, for runs without a manifest")
    a.add_argument("--arch-param", action="append", metavar="KEY=VALUE",
                   help="architecture parameter, repeatable, for runs without a manifest")
    a.add_argument("--num-classes", type=_num_classes, default=None,
                   help="classes of the model head, for runs without a manifest")
    a.add_argument("--pattern", default=None,
                   help="checkpoint file glob with {epoch}, e.g. 'snap_{epoch}.pt'")
    a.add_argument("--no-cache", action="store_true", help="ignore cached features")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_argument("--no-plot", action="store_true", help="do not write analysis/tradeoff.png")
    a.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the probes' splits and the estimators' subsampling")
    a.add_argument("--no-wait", action="store_true",
                   help="if another analysis of this run is in progress, stop with 'run is busy' "
                        "instead of waiting for it")
    a.add_argument("--follow-symlinks", action="store_true",
                   help="accept checkpoints reached through symbolic links that lead out of the "
                        "run directory (e.g. to scratch storage); refused by default")
    _add_data_args(a, None)

    pl = sub.add_parser("plot", help="write every chart the analysed metrics allow", **common,
                        description=_wrap("Write every chart the analysed runs' metrics allow into "
                                    "--out (one file per chart and format)."))
    pl.add_argument("runs", nargs="+", help="analysed run directories")
    pl.add_argument("--out", required=True, help="folder for the charts (created if missing)")
    pl.add_argument("--format", nargs="+", default=["png"], choices=["png", "svg", "pdf"],
                    help="file format(s)")

    r = sub.add_parser("report", help="write a self-contained HTML report", **common,
                       description=_wrap("Write one self-contained HTML file (charts "
                                         "embedded) with the findings, charts and settings "
                                         "of the analysed runs."))
    r.add_argument("runs", nargs="+", help="analysed run directories")
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write")

    d = sub.add_parser("demo", help="CE and CTC runs on the embedded data, analysed and charted",
                       **common, description=_wrap("Train a cross-entropy and a CTC run on the "
                       "embedded shapes data with one seed, analyse both, chart them and write "
                       "OUT/report.html and OUT/README_table.md."))
    d.add_argument("--out", default="runs/demo", help="folder of the two runs and the charts")
    d.add_argument("--epochs", type=_demo_epochs, default=16, help="epochs per run (>= 2)")
    d.add_argument("--seed", type=nonnegative_int, default=0, help="seed of both runs")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    d.add_argument("--quick", action="store_true", help="tiny data and few epochs (smoke test)")
    d.add_argument("--fresh", action="store_true", help="delete earlier demo runs first")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--threads", type=positive_int, default=2,
                   help="torch intra-op threads; fixed, because CPU kernels round differently "
                        "per thread count (the same seed then gives the same table)")
    d.add_argument("--update-readme", metavar="README", default=None,
                   help="after the demo, replace the table between the demo markers of this "
                        "README.md with OUT/README_table.md")

    sub.add_parser("list", help="list architectures, datasets and metrics", **common,
                   description=_wrap("List the built-in architectures, datasets and metrics."))
    return parser


def _demo_epochs(text: str) -> int:
    # CTC needs a stage 1 and a stage 2, so at least two epochs
    return int(_number(text, int, "an integer >= 2", lambda v: v >= 2))


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


def _check_train_args(args: argparse.Namespace) -> None:
    """Checks across options and names, before torch is imported or any data is loaded."""
    from dtprobe.errors import ConfigError
    from dtprobe.names import check_name

    check_name(args.dataset, "dataset", "--dataset")
    check_name(args.arch, "architecture", "--arch")
    if args.stop_after is not None and args.stop_after > args.epochs:
        raise ConfigError(f"--stop-after {args.stop_after} is past --epochs {args.epochs}")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
    if args.ctc and args.stage_two_epoch is not None and args.stage_two_epoch > args.epochs:
        raise ConfigError(f"--stage-two-epoch {args.stage_two_epoch} exceeds --epochs "
                          f"{args.epochs}: stage 2 would never start")
    check_output_dir(args.out, "--out")


def cmd_train(args: argparse.Namespace) -> int:
    _check_train_args(args)
    from dtprobe.training.trainer import train

    out = train(_train_config(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"run written to {out} (manifest: {out / 'manifest.json'})")
    return 0


def _check_analyze_args(args: argparse.Namespace) -> None:
    from dtprobe.errors import ConfigError
    from dtprobe.names import check_metric_names, check_name

    check_name(args.dataset, "dataset", "--dataset")
    check_name(args.arch, "architecture", "--arch")
    check_metric_names(args.metrics)
    analysis = Path(args.run_dir) / "analysis"
    if analysis.parent.is_dir():  # a missing run is reported by the analysis itself
        try:
            check_output_dir(analysis, "RUN_DIR")
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise ConfigError(f"{analysis}: cannot create the analysis folder ({reason}); "
                              "analyse a writable copy of the run") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_analyze_args(args)
    from dtprobe.analysis import analyze

    results = analyze(args.run_dir, metrics=args.metrics, device=args.device,
                      arch=args.arch, num_classes=args.num_classes,
                      arch_params=_parse_kv(args.arch_param, "--arch-param") or None,
                      dataset=args.dataset, dataset_params=_dataset_params(args) or None,
                      pattern=args.pattern, compare=args.compare, layers=args.layers,
                      batch_size=args.batch_size, use_cache=not args.no_cache,
                      progress=not args.no_progress, plot=not args.no_plot, seed=args.seed,
                      wait=not args.no_wait, follow_symlinks=args.follow_symlinks)
    if results is None:  # a torchrun rank > 0: rank 0 merged and reports
        return 0
    out = Path(args.run_dir) / "analysis"
    stats = getattr(results, "stats", None)
    failed = len(results.failures)
    total = stats.checkpoints if stats is not None else None
    if failed and (results.table.empty or (total is not None and failed >= total)):
        print(f"dtprobe analyze: all {failed} checkpoint(s) failed (each reason above and in "
              f"{out / 'failures.csv'}); no metrics were computed", file=sys.stderr)
        return EXIT_PARTIAL
    _print_summary(results)
    if stats is not None:
        print(stats.summary())
    chart = out / "tradeoff.png"
    shown = f"  chart: {chart}" if not args.no_plot and chart.is_file() else ""
    print(f"results: {out / 'metrics.csv'}{shown}")
    if failed:
        print(f"dtprobe analyze: {failed} of {total if total is not None else '?'} "
              f"checkpoint(s) failed (each reason above and in {out / 'failures.csv'}); "
              "the others were analysed", file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from dtprobe.plotting import save_all_figures
    from dtprobe.results import load_results

    paths = save_all_figures(load_results(args.runs), args.out, formats=tuple(args.format))
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    check_output_file(args.output, "-o/--output")
    from dtprobe.report import write_report
    from dtprobe.results import load_results

    out = write_report(load_results(args.runs), args.output)
    print(f"report written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    if args.update_readme is not None:
        check_output_file(args.update_readme, "--update-readme")
    from dtprobe.demo import run_demo

    return run_demo(out=Path(args.out), epochs=args.epochs, seed=args.seed, device=args.device,
                    quick=args.quick, fresh=args.fresh, threads=args.threads,
                    progress=not args.no_progress,
                    update_readme=args.update_readme)


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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad option (its one line is printed), --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
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
    except OSError as exc:
        # an output path that passed the checks above failed later (disk full, permissions
        # changed): still one line, exit 2, naming the file
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dtprobe {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; completed work is saved (re-run to continue)", file=sys.stderr)
        return 130
    if args.command in ("train", "analyze", "demo") and os.environ.get("RANK", "0") == "0":
        print(f"done in {time.perf_counter() - start:.1f}s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
