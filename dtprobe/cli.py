"""Command line: dtprobe train | sweep | analyze | export | plot | report | demo | list.

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
import contextlib
import errno
import math
import os
import re
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
  dtprobe sweep --objectives ce ctc --out runs/sweep   one run per objective and seed
  dtprobe analyze runs/ce               analyse every checkpoint -> runs/ce/analysis/
  dtprobe report runs/ce runs/ctc       one self-contained HTML report comparing runs"""

EPILOG = """\
exit status: 0 success; 1 the analysis finished but some checkpoints failed (reasons printed
and in analysis/failures.csv), or some runs of a sweep failed (sweep.json); 2 bad option,
name, file or output path (one line on stderr; --debug shows the traceback); 130 interrupted
(completed work is kept)."""


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


def _memory_budget(text: str) -> int:
    """argparse type: a size such as 512M or 8G (see :func:`dtprobe.analysis.memory.parse_size`)."""
    from dtprobe.analysis.memory import parse_size, shown_size
    from dtprobe.errors import ConfigError

    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(
            str(exc).removeprefix(f"--memory-budget {shown_size(text)}: ")) from None


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
    from dtprobe.literals import json_value

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        out[key] = json_value(raw)
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


_COMMON: dict[str, Any] = dict(formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtprobe", description=DESCRIPTION, epilog=EPILOG, **_COMMON)
    parser.add_argument("--version", action="version", version=f"dtprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a run and write checkpoints + manifest", **_COMMON,
        description=_wrap("Train a network with cross-entropy (default), CTC or another "
                          "registered objective and save a checkpoint every --save-every "
                          "epochs, plus OUT/manifest.json describing the series."))
    t.add_argument("--out", required=True, help="run directory to create")
    _add_train_args(t)

    sw = sub.add_parser("sweep", help="train and analyse one run per objective and seed, then "
                                      "chart them together (Kornblith et al. 2021's figures)",
                        **_COMMON, description=_wrap(
                            "Train and analyse one run per objective and seed into OUT/<objective>"
                            "-seed<seed>, then write OUT/sweep_summary.csv and OUT/figures/."))
    sw.add_argument("--objectives", nargs="+", required=True, metavar="NAME",
                    help="registered objectives (see `dtprobe list`)")
    sw.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0],
                    help="seeds; one run per objective and seed")
    sw.add_argument("--out", required=True, help="sweep directory (one sub-directory per run)")
    sw.add_argument("--metrics", nargs="+", default=None,
                    help="metrics to analyse (default: the default set)")
    sw.add_argument("--param", action="append", metavar="OBJECTIVE:KEY=VALUE",
                    help="parameter for one objective only, repeatable "
                         "(e.g. dropout:keep_prob=0.5)")
    _add_train_args(sw, sweep=True)
    _add_analysis_parsers(sub)
    return parser


def _add_train_args(t: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The ``dtprobe train`` flags (``dtprobe sweep`` passes them through to every run)."""
    _add_data_args(t, "shapes")
    t.add_argument("--arch", default="small_cnn", help="architecture (see `dtprobe list`)")
    t.add_argument("--arch-param", action="append", metavar="KEY=VALUE",
                   help="architecture parameter, repeatable (e.g. cifar_stem=true)")
    t.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    t.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per optimiser step (split over ranks under torchrun)")
    t.add_argument("--lr", type=positive_float, default=0.05, help="peak SGD learning rate")
    t.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=nonnegative_float, default=None,
                   help="SGD weight decay (default 5e-4, or the --recipe's value)")
    t.add_argument("--warmup-epochs", type=nonnegative_int, default=1,
                   help="epochs of linear learning-rate warm-up before the cosine decay")
    t.add_argument("--augment", default="auto", choices=["auto", "none", "crop", "crop-flip"],
                   help="training augmentation; auto = none for shapes/digits, else crop-flip")
    t.add_argument("--save-every", type=positive_int, default=2,
                   help="save a checkpoint every N epochs (epoch 0 and the last are always saved)")
    if not sweep:
        t.add_argument("--seed", type=nonnegative_int, default=0,
                       help="seed of initialisation, data order and augmentation")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--stop-after", type=positive_int, default=None, metavar="EPOCH",
                   help="save and exit after this epoch (continue later with --resume)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not sweep:
        t.add_argument("--analyze-every", type=positive_int, default=None, metavar="N",
                       help="analyse the run while it trains, in a background process at the "
                            "lowest CPU priority, once every N new checkpoints (on the CPU; log in "
                            f"OUT/{'analyze_watch.log'})")
    obj = t.add_argument_group("objective and schedule")
    if not sweep:
        obj.add_argument("--objective", default=None, metavar="NAME",
                         help="training objective (see `dtprobe list`); default ce")
        obj.add_argument("--objective-param", action="append", metavar="KEY=VALUE",
                         help="objective hyperparameter, repeatable (e.g. alpha=0.2)")
    obj.add_argument("--recipe", default=None, choices=["kornblith2021"],
                     help="a paper's training facts for any objective; kornblith2021: weight "
                          "decay 8e-5 as l2_loss on non-BatchNorm non-bias parameters, head "
                          "N(0, 0.01), checkpoints hold the EMA of the weights")
    obj.add_argument("--recipe-param", action="append", metavar="KEY=VALUE",
                     help="recipe parameter, repeatable (ema_decay=0.9999)")
    obj.add_argument("--schedule", default="default", choices=["default", "reference"],
                     help="default: warm-up + one cosine; reference: the CTC code's two-phase "
                          "schedule (cosine to S, restart at 0.1 lr), for every objective")
    obj.add_argument("--switch-epoch", type=positive_int, default=None, metavar="S",
                     help="last epoch of stage 1 of --schedule reference (default: CTC's S, "
                          "else 2/3 of --epochs)")
    obj.add_argument("--stage1-weight-decay", type=nonnegative_float, default=None,
                     help="weight decay in stage 1 of --schedule reference (default 1e-3)")
    ctc = t.add_argument_group("CTC (contrastive temporal coding, Cui et al. 2022); unset "
                               "values come from --ctc-preset")
    if not sweep:
        ctc.add_argument("--ctc", action="store_true", help="short for --objective ctc")
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


def _add_analysis_parsers(sub) -> None:
    a = sub.add_parser(
        "analyze", help="analyse every checkpoint of a run", **_COMMON,
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
    a.add_argument("--layers", nargs="+", default=[], metavar="NAME",
                   help="also analyse these modules' outputs (pooled), layer x epoch: probes, "
                        "class separation, RankMe, CKA to final and between runs; 'auto' = the "
                        "architecture's blocks (`dtprobe layers RUN` lists them)")
    # extend: `--downstream A --downstream B` analyses both (a second flag used to drop A)
    a.add_argument("--downstream", nargs="+", action="extend", default=[], metavar="SPEC",
                   help="transfer datasets DATASET[:KEY=VALUE,...], e.g. digits textures "
                        "cinic10:root=/data/cinic10 imagefolder:root=/data/pets,name=pets; "
                        "probes and transferability scores per checkpoint on each")
    a.add_argument("--downstream-metrics", nargs="+", default=None, metavar="METRIC",
                   help="metrics computed on each downstream dataset (default: probe_accuracy "
                        "knn_accuracy fewshot_ridge fewshot_ncm logme h_score transrate gbc "
                        "leep nce)")
    a.add_argument("--fewshot-shots", nargs="+", type=positive_int, default=[1, 5, 10, 25],
                   metavar="K", help="images per class of the few-shot metrics (fewshot_ridge, "
                                     "fewshot_ncm; default 1 5 10 25)")
    a.add_argument("--fewshot-draws", type=positive_int, default=5, metavar="N",
                   help="seeded draws of the shots per few-shot count (default 5)")
    a.add_argument("--finetune", action="store_true",
                   help="also fine-tune the whole network of every checkpoint on every "
                        "downstream dataset (fixed recipe: SGD 0.9, 4-epoch cosine, lr grid "
                        "0.003/0.01/0.03 chosen on a 20%% validation split; costs about 12 "
                        "epochs over the dataset per checkpoint); finetune_accuracy rows")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="images per forward pass during extraction")
    a.add_argument("--engine", default="eager", choices=["eager", "onnx"],
                   help="what runs the forward passes: PyTorch (eager), or ONNX Runtime on the "
                        "CPU (onnx: exported per checkpoint, checked against eager to 1e-4, "
                        "eager again if it disagrees; pip install 'dtprobe[onnx]')")
    a.add_argument("--feature-dtype", default="float32",
                   choices=["float32", "float16", "bfloat16"],
                   help="precision of the cached features and layer outputs (logits stay "
                        "float32): half precision halves the cache; metrics still compute in "
                        "float32/float64 on the rounded values")
    sc = a.add_argument_group("scale (ImageNet-sized data)")
    sc.add_argument("--max-samples", type=positive_int, default=None, metavar="N",
                    help="analyse a stable class-stratified subset of at most N images per "
                         "split (source and downstream; the same images at every checkpoint, "
                         "recorded in analysis/samples.json and the rows' params)")
    sc.add_argument("--image-store", default="auto", metavar="DIR|auto|none",
                    help="decode folder datasets once into uint8 stores in DIR and stream "
                         "them per batch (auto: $DTPROBE_IMAGE_STORE or ~/.cache/dtprobe/"
                         "images; none: decode into memory)")
    sc.add_argument("--skip-bad-images", action="store_true",
                    help="leave out image files that cannot be decoded (listed in "
                         "analysis/samples.json and the summary) instead of failing the "
                         "folder dataset that holds them (default)")
    sc.add_argument("--shard", default="auto", choices=["auto", "checkpoints", "images"],
                    help="under torchrun: split the checkpoints over the ranks, or the images "
                         "of every checkpoint (auto: images when there are fewer checkpoints "
                         "than ranks)")
    sc.add_argument("--memory-budget", type=_memory_budget, default=None, metavar="SIZE",
                    help="most memory the analysis may hold, e.g. 512M or 8G (default: 3/4 "
                         "of available memory); refused up front, with what would fit")
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
    a.add_argument("--probe-protocol", default="kornblith2019", choices=["kornblith2019", "short"],
                   help="linear probe: 'kornblith2019' is the papers' protocol (45 values of C "
                        "in [1e-6, 1e5], full sweep, stratified validation split, refit on "
                        "train + validation); 'short' sweeps 9 values in [1e-3, 10] and stops "
                        "after 3 without improvement (faster; recorded in every row's params)")
    a.add_argument("--no-wait", action="store_true",
                   help="if another analysis of this run is in progress, stop with 'run is busy' "
                        "instead of waiting for it")
    a.add_argument("--epoch-from", default="auto", choices=["auto", "name", "metadata", "order"],
                   help="runs without a manifest: take epochs from the file/folder names, the "
                        "framework's records (trainer_state.json, Lightning epoch, safetensors "
                        "metadata) or the save order; default: each layout's best source")
    a.add_argument("--weights", default="auto", metavar="ema|raw|KEY",
                   help="which weights of each file: raw (default when present), ema, or the "
                        "key/prefix holding them (e.g. state_dict_ema)")
    a.add_argument("--strip-prefix", default=None, metavar="PREFIX",
                   help="keep only weight names starting with PREFIX (e.g. 'teacher.') and "
                        "remove it")
    a.add_argument("--trust-pickles", action="store_true",
                   help="unpickle files the safe loader refuses (they name classes, e.g. "
                        "Lightning hyper_parameters holding modules): runs code from the file, "
                        "so only for files you trust; recorded in analysis/checkpoints.json")
    a.add_argument("--follow-symlinks", action="store_true",
                   help="accept checkpoints reached through symbolic links that lead out of the "
                        "run directory (e.g. to scratch storage); refused by default")
    _add_data_args(a, None)
    w = a.add_argument_group("live analysis (a run still training)")
    w.add_argument("--watch", action="store_true",
                   help="follow the run: analyse each new complete checkpoint, update the table "
                        "and charts, exit when the manifest says training finished (or Ctrl-C)")
    w.add_argument("--report", default=None, metavar="FILE",
                   help="with --watch: also rewrite this HTML report after each update")
    w.add_argument("--poll", type=positive_float, default=5.0,
                   help="with --watch: seconds between looks")
    w.add_argument("--idle-timeout", type=positive_float, default=None,
                   metavar="SECONDS",
                   help="with --watch: stop after this long without a new checkpoint")
    w.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="with --watch: analyse once N new checkpoints are complete")

    ly = sub.add_parser("layers", help="list the modules of a run's architecture that "
                        "--layers accepts, with their output shapes and the auto selection",
                        **_COMMON, description=_wrap(
                            "List the modules of RUN_DIR's architecture that --layers accepts, "
                            "with their output shapes; * marks the --layers auto selection."))
    ly.add_argument("run_dir", help="run directory (with manifest.json or checkpoint files)")
    ly.add_argument("--arch", default=None, help="architecture, for runs without a manifest")
    ly.add_argument("--arch-param", action="append", metavar="KEY=VALUE",
                    help="architecture parameter, repeatable, for runs without a manifest")
    ly.add_argument("--num-classes", type=_num_classes, default=None,
                    help="classes of the model head, for runs without a manifest")
    ly.add_argument("--all", action="store_true", help="every module, not only containers")
    _add_data_args(ly, None)

    ex = sub.add_parser("export", help="export an analysed run's metrics to other tools",
                        **_COMMON, description=_wrap("Export the per-epoch metrics of analysed "
                                                     "runs to other tools (TensorBoard)."))
    ex.add_argument("runs", nargs="+", help="analysed run directories")
    ex.add_argument("--tensorboard", required=True, metavar="DIR",
                    help="write the per-epoch metrics as TensorBoard scalars into DIR")
    ex.add_argument("--x", choices=["auto", "step", "epoch"], default="auto",
                    help="x axis of the scalars (auto: steps when every row has one)")


    pl = sub.add_parser("plot", help="write every chart the analysed metrics allow", **_COMMON,
                        description=_wrap("Write every chart the analysed runs' metrics allow into "
                                    "--out (one file per chart and format)."))
    pl.add_argument("runs", nargs="+", help="analysed run directories")
    pl.add_argument("--out", required=True, help="folder for the charts (created if missing)")
    pl.add_argument("--format", nargs="+", default=["png"], choices=["png", "svg", "pdf"],
                    help="file format(s)")

    r = sub.add_parser("report", help="write a self-contained HTML report", **_COMMON,
                       description=_wrap("Write one self-contained HTML file (charts "
                                         "embedded) with the findings, charts and settings "
                                         "of the analysed runs."))
    r.add_argument("runs", nargs="+", help="analysed run directories")
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write")

    d = sub.add_parser("demo", help="CE and CTC runs on the embedded data, analysed and charted",
                       **_COMMON, description=_wrap("Train a cross-entropy and a CTC run on the "
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

    sub.add_parser("list", help="list architectures, datasets, metrics and objectives",
                   **_COMMON, description=_wrap("List the built-in architectures, datasets, "
                                                "metrics and training objectives."))


def _demo_epochs(text: str) -> int:
    # CTC needs a stage 1 and a stage 2, so at least two epochs
    return int(_number(text, int, "an integer >= 2", lambda v: v >= 2))


def _objective_name(args: argparse.Namespace) -> str:
    from dtprobe.errors import ConfigError

    if getattr(args, "ctc", False):
        if args.objective not in (None, "ctc"):
            raise ConfigError(f"--ctc is short for --objective ctc; drop one of --ctc and "
                              f"--objective {args.objective}")
        return "ctc"
    return args.objective or "ce"


def _train_config(args: argparse.Namespace, *, objective: str | None = None,
                  objective_params: dict[str, Any] | None = None, out: str | None = None,
                  seed: int | None = None):
    """A :class:`TrainConfig` from ``dtprobe train`` flags (``dtprobe sweep`` overrides the
    objective, its parameters, the output and the seed per run)."""
    from dtprobe.training.trainer import TrainConfig

    name = objective or _objective_name(args)
    params = (objective_params if objective_params is not None
              else _parse_kv(getattr(args, "objective_param", None), "--objective-param"))
    ctc: dict[str, Any] = {"preset": args.ctc_preset}
    for key in ("stage_two_epoch", "alpha", "tau1", "m1", "beta", "tau2", "m2", "nce_k",
                "proj_dim"):
        if getattr(args, key) is not None:
            ctc[key] = getattr(args, key)
    if args.freeze_stage1_projector:
        ctc["freeze_stage1_projector"] = True
    if name == "ctc" and "stage_two_epoch" not in ctc and "stage_two_epoch" not in params:
        ctc["stage_two_epoch"] = (args.switch_epoch if args.switch_epoch is not None
                                  else max(1, round(args.epochs * 2 / 3)))
    return TrainConfig(
        out=out or args.out, dataset=args.dataset, dataset_params=_dataset_params(args) or {},
        arch=args.arch, arch_params=_parse_kv(args.arch_param, "--arch-param"),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, augment=args.augment,
        save_every=args.save_every, seed=args.seed if seed is None else seed,
        device=args.device, objective=name, objective_params=params,
        ctc=ctc if name == "ctc" else {}, schedule=args.schedule, recipe=args.recipe,
        recipe_params=_parse_kv(args.recipe_param, "--recipe-param"),
        switch_epoch=args.switch_epoch, stage1_weight_decay=args.stage1_weight_decay,
        resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)


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
    if args.stage_two_epoch is not None and args.stage_two_epoch > args.epochs:
        raise ConfigError(f"--stage-two-epoch {args.stage_two_epoch} exceeds --epochs "
                          f"{args.epochs}: stage 2 would never start")
    if args.switch_epoch is not None and args.switch_epoch > args.epochs:
        raise ConfigError(f"--switch-epoch {args.switch_epoch} exceeds --epochs {args.epochs}")
    check_output_dir(args.out, "--out")


def cmd_train(args: argparse.Namespace) -> int:
    _check_train_args(args)
    from dtprobe.training.trainer import train

    cfg = _train_config(args)
    from dtprobe.training.objectives import check_objective_params

    check_objective_params(cfg.objective, cfg.objective_params)  # before any data is loaded
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    watcher = _start_watcher(Path(args.out), args.analyze_every) if (
        args.analyze_every and rank0) else None
    try:
        out = train(cfg)
    finally:
        if watcher is not None:
            _stop_watcher(Path(args.out), watcher)
    if rank0:
        print(f"run written to {out} (manifest: {out / 'manifest.json'})")
        if watcher is not None:
            print(f"analysis: {out / 'analysis' / 'metrics.csv'} (log {out / WATCH_LOG})")
    return 0


WATCH_LOG = "analyze_watch.log"


def _start_watcher(out: Path, every: int):
    """``dtprobe analyze OUT --watch`` in a background process at the lowest CPU priority."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    log = os.open(out / WATCH_LOG, flags, 0o644)
    nice = (lambda: os.nice(19)) if hasattr(os, "nice") else None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "dtprobe", "analyze", str(out), "--watch", "--every",
             str(every), "--poll", "2", "--no-progress", "--device", "cpu"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=nice)
    finally:
        os.close(log)


def _stop_watcher(out: Path, proc) -> None:
    """Let the watcher finish the last checkpoints when training completed; else interrupt it
    (it keeps everything analysed so far)."""
    import signal

    from dtprobe.analysis.watch import run_finished

    try:
        if not run_finished(out):
            proc.send_signal(signal.SIGINT)
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def cmd_sweep(args: argparse.Namespace) -> int:
    from dtprobe.names import check_metric_names

    args.stop_after = getattr(args, "stop_after", None)
    _check_train_args(args)
    check_metric_names(args.metrics)
    from dtprobe.errors import ConfigError
    from dtprobe.training.objectives import check_objective_params, get_objective
    from dtprobe.training.sweep import run_sweep

    for name in args.objectives:  # names and parameters checked before anything trains
        get_objective(name)
    per_objective: dict[str, dict[str, Any]] = {}
    for item in args.param or []:
        if ":" not in item:
            raise ConfigError(f"--param expects OBJECTIVE:KEY=VALUE, got {item!r}")
        name, kv = item.split(":", 1)
        if name not in args.objectives:
            raise ConfigError(f"--param {item!r}: {name!r} is not one of the swept --objectives "
                              f"({', '.join(args.objectives)})")
        per_objective.setdefault(name, {}).update(_parse_kv([kv], "--param"))
    for name, params in per_objective.items():
        check_objective_params(name, params)
    configs = {(name, seed): _train_config(args, objective=name,
                                            objective_params=per_objective.get(name, {}),
                                            out=str(Path(args.out) / f"{name}-seed{seed}"),
                                            seed=seed)
               for name in args.objectives for seed in args.seeds}
    summary = run_sweep(configs, Path(args.out), metrics=args.metrics, device=args.device,
                        progress=not args.no_progress)
    cols = [c for c in summary.columns if c in ("objective", "seeds", "diverged")
            or c.split("_std")[0] in ("source_accuracy", "class_separation", "transfer")]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"sweep written to {args.out} (table: {Path(args.out) / 'sweep_summary.csv'}, "
          f"charts: {Path(args.out) / 'figures'}; report: dtprobe report {args.out})")
    failed = int(summary["failed"].sum()) if "failed" in summary.columns else 0
    if failed:  # a script must not read a sweep with lost runs as a clean one
        from dtprobe.training.sweep import SWEEP_FILE
        print(f"dtprobe sweep: {failed} of {len(configs)} run(s) failed (reasons above and in "
              f"{Path(args.out) / SWEEP_FILE}; rerun the same command to retry them)",
              file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def _check_analyze_args(args: argparse.Namespace) -> None:
    from dtprobe.errors import ConfigError
    from dtprobe.names import check_metric_names, check_name
    from dtprobe.table import ANALYSIS_DIR

    check_name(args.dataset, "dataset", "--dataset")
    check_name(args.arch, "architecture", "--arch")
    check_metric_names(args.metrics)
    analysis = Path(args.run_dir) / ANALYSIS_DIR
    if analysis.parent.is_dir():  # a missing run is reported by the analysis itself
        try:
            check_output_dir(analysis, "RUN_DIR")
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise ConfigError(f"{analysis}: cannot create the analysis folder ({reason}); "
                              "analyse a writable copy of the run") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_analyze_args(args)
    if args.report is not None:
        check_output_file(args.report, "--report")
    if args.watch:
        return _watch(args)
    if args.report is not None:
        from dtprobe.errors import ConfigError

        raise ConfigError("--report goes with --watch; for a finished run use "
                          "`dtprobe report RUN -o FILE`")
    from dtprobe.analysis import analyze

    results = analyze(args.run_dir, options=_analysis_options(args))
    return _finish_analyze(args, results)


def _analysis_options(args: argparse.Namespace):
    """The :class:`~dtprobe.analysis.plan.AnalysisOptions` of ``dtprobe analyze``'s flags, built
    (parsed, checked, device resolved) once by :meth:`AnalysisOptions.build`, as for
    :func:`dtprobe.analysis.analyze`."""
    from dtprobe.analysis.plan import AnalysisOptions

    return AnalysisOptions.build(
        metrics=args.metrics, device=args.device, arch=args.arch,
        num_classes=args.num_classes,
        arch_params=_parse_kv(args.arch_param, "--arch-param") or None,
        dataset=args.dataset, dataset_params=_dataset_params(args) or None,
        pattern=args.pattern, compare=args.compare, layers=args.layers,
        batch_size=args.batch_size, feature_dtype=args.feature_dtype,
        engine=args.engine, use_cache=not args.no_cache,
        progress=not args.no_progress, plot=not args.no_plot, seed=args.seed,
        probe_protocol=args.probe_protocol, wait=not args.no_wait,
        follow_symlinks=args.follow_symlinks,
        epoch_from=args.epoch_from, weights=args.weights,
        strip_prefix=args.strip_prefix, trust_pickles=args.trust_pickles,
        downstream=args.downstream, downstream_metrics=args.downstream_metrics,
        max_samples=args.max_samples, image_store=args.image_store,
        memory_budget=args.memory_budget, shard=args.shard,
        fewshot_shots=args.fewshot_shots, fewshot_draws=args.fewshot_draws,
        finetune=args.finetune,
        skip_bad_images=args.skip_bad_images)


def _watch(args: argparse.Namespace) -> int:
    from dtprobe.analysis.watch import watch

    results = watch(args.run_dir, poll=args.poll, idle_timeout=args.idle_timeout,
                    report=args.report, every=args.every, options=_analysis_options(args))
    if results is None:
        print(f"dtprobe analyze --watch: no checkpoint appeared in {args.run_dir}")
        return 0
    return _finish_analyze(args, results)


def _finish_analyze(args: argparse.Namespace, results) -> int:
    from dtprobe.table import ANALYSIS_DIR

    if results is None:  # a torchrun rank > 0: rank 0 merged and reports
        return 0
    out = Path(args.run_dir) / ANALYSIS_DIR
    stats = getattr(results, "stats", None)
    failed = len(results.failures)
    total = stats.checkpoints if stats is not None else None
    # downstream failures (a dataset, or one checkpoint on one dataset) are not checkpoints lost
    lost = total - stats.analysed if stats is not None else failed
    if failed and (results.table.empty or (total is not None and lost >= total)):
        # nothing was analysed: no summary, no chart named, no "the others were analysed"
        print(f"dtprobe analyze: {_failure_summary(results.failures, stats, out)}",
              file=sys.stderr)
        return EXIT_PARTIAL
    _print_summary(results)
    for run, text in getattr(results, "epoch_notes", {}).items():
        if text:
            print(f"{run}: {text}")
    if stats is not None:
        print(stats.summary())
    chart = out / "tradeoff.png"
    shown = f"  chart: {chart}" if not args.no_plot and chart.is_file() else ""
    print(f"results: {out / 'metrics.csv'}{shown}")
    if failed:
        print(f"dtprobe analyze: {_failure_summary(results.failures, stats, out)}",
              file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from dtprobe.analysis.data import prepare_data
    from dtprobe.analysis.features import plan_layers
    from dtprobe.analysis.plan import plan_run

    plan = plan_run(args.run_dir, arch=args.arch, num_classes=args.num_classes,
                    arch_params=_parse_kv(args.arch_param, "--arch-param") or None,
                    dataset=args.dataset, dataset_params=_dataset_params(args) or None)
    model, described, blocks = plan_layers(plan, prepare_data(plan, torch.device("cpu")))
    auto = set(blocks)
    containers = {n for n, m in model.named_modules() if n and any(True for _ in m.children())}
    print(f"{plan.arch}: modules with tensor outputs (* = --layers auto; = penultimate: its "
          "output is the penultimate feature)")
    for name, shape, is_penultimate in described:
        if not (args.all or name in containers or name in auto):
            continue
        mark = "*" if name in auto else ("=" if is_penultimate else " ")
        print(f"  {mark} {name:40s} {'x'.join(map(str, shape))}")
    return 0


def _failure_summary(failures, stats, out: Path) -> str:
    """One line: how many checkpoints failed; when all did, for one reason, that reason."""
    total = stats.checkpoints if stats is not None else None
    where = f"{out / 'failures.csv'}"
    lost = total - stats.analysed if stats is not None else len(failures)
    if total is None or lost < total:
        downstream = len(failures) - lost
        what = [f"{lost} of {total if total is not None else '?'} checkpoint(s) failed"] \
            if lost else []
        what += [f"{downstream} downstream dataset or checkpoint x dataset failure(s)"] \
            if downstream else []
        return (f"{'; '.join(what)} (each reason above and in {where}); the others were "
                "analysed")
    # Reasons name each file's own paths; the same cause is the same text without them.
    reasons = {re.sub(r"/\S*", "", str(r)) for r in failures["reason"]}
    if len(reasons) == 1:
        return (f"all {total} checkpoint(s) failed for one reason: {failures['reason'].iloc[0]} "
                f"(details in {where})")
    return (f"all {total} checkpoint(s) failed, for {len(reasons)} different reasons (each above "
            f"and in {where}); nothing was analysed")


def cmd_export(args: argparse.Namespace) -> int:
    check_output_dir(args.tensorboard, "--tensorboard")
    from dtprobe.results.core import load_results
    from dtprobe.results.export import export_tensorboard

    n = export_tensorboard(load_results(args.runs), args.tensorboard, x=args.x)
    print(f"{n} scalars written to {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from dtprobe.plotting import save_all_figures
    from dtprobe.results.core import load_results
    from dtprobe.training.sweep import expand_sweeps

    paths = save_all_figures(load_results(expand_sweeps(args.runs)), args.out,
                             formats=tuple(args.format))
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    check_output_file(args.output, "-o/--output")
    from dtprobe.results.core import load_results
    from dtprobe.results.report import write_report
    from dtprobe.training.sweep import expand_sweeps

    out = write_report(load_results(expand_sweeps(args.runs)), args.output)
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
    metrics = available_metrics()
    for name, spec in metrics.items():
        if spec.similarity is None:
            first = spec.description.splitlines()[0] if spec.description else ""
            print(f"  {'*' if spec.default else ' '} {name:22s} {first}")
    print("similarity measures (between epochs, layers and runs; * = default):")
    for name, spec in metrics.items():
        sim = spec.similarity
        if sim is not None:
            first = spec.description.splitlines()[0] if spec.description else ""
            print(f"  {'*' if spec.default else ' '} {name:22s} {sim.direction:20s} "
                  f"invariant to: {', '.join(sim.invariances)}")
            print(f"    {'':22s} {first}")
    from dtprobe.training.objectives import available_objectives

    print("objectives (--objective NAME, --objective-param KEY=VALUE):")
    for name, spec in available_objectives().items():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "-"
        print(f"  {name:16s} {spec.description}")
        print(f"  {'':16s}   paper: {spec.paper}; defaults: {defaults}")
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "analyze": cmd_analyze, "plot": cmd_plot,
            "report": cmd_report, "demo": cmd_demo, "list": cmd_list, "export": cmd_export,
            "layers": cmd_layers}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad option (its one line is printed), --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    from checkpoints_manifest import ManifestError
    from dtprobe.errors import DtprobeError

    for stream in (sys.stdout, sys.stderr):  # undecodable file names must not crash a print
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    start = time.perf_counter()
    from dtprobe.runtime.isolation import set_debug

    set_debug(args.debug)  # tracebacks of failures contained to one checkpoint or dataset too
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
    except BrokenPipeError:
        return _closed_pipe()
    except OSError as exc:  # the environment, not the input: disk full, read-only, quota ...
        if args.debug:
            raise
        print(f"dtprobe {args.command}: error: {environment_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        timed = ("train", "sweep", "analyze", "demo")
        if args.command in timed and os.environ.get("RANK", "0") == "0":
            print(f"done in {time.perf_counter() - start:.1f}s")
        sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()
    return code


def _closed_pipe() -> int:
    """The reader of stdout went away (``dtprobe list | head -1``): stop quietly.

    As in the recipe of Python's documentation (signal module, "Note on SIGPIPE"): point stdout
    at devnull so that the interpreter's final flush does not fail again. Everything computed
    is already on disk; the status is that of an environment error, never 1 (failed
    checkpoints)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_USAGE


_ENV_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and re-run (completed work is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free some space and re-run (completed work is "
                  "kept)",
    errno.EROFS: "the file system is read-only: work on a writable copy of the run",
    errno.EACCES: "permission denied: work on a copy of the run you can write to",
    errno.EPERM: "permission denied: work on a copy of the run you can write to",
    errno.ELOOP: "a symbolic link is in the way (dtprobe never writes through links): remove it",
}


def environment_message(exc: OSError) -> str:
    """One line for an operating-system error: the file, what happened and what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    hint = _ENV_HINTS.get(exc.errno or -1, "check the file and re-run")
    return f"{where}{what}; {hint}"


if __name__ == "__main__":
    raise SystemExit(main())
