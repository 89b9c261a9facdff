"""Command line: ``dtprobe train | sweep | analyze | plot | report | demo | list``.

User errors (:class:`dtprobe.errors.DtprobeError`, manifest errors) print one line and exit 2;
``--debug`` shows the traceback instead. Exit statuses: 0 success, 1 the analysis finished but
some checkpoints failed (each reason printed and in ``analysis/failures.csv``), 2 user error
(bad option or file, run busy with ``--no-wait``), 130 interrupted (completed work is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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
    t.add_argument("--out", required=True, help="run directory to create")
    _add_train_args(t)

    sw = sub.add_parser("sweep", help="train and analyse one run per objective and seed, then "
                                      "chart them together (Kornblith et al. 2021's figures)")
    sw.add_argument("--objectives", nargs="+", required=True, metavar="NAME",
                    help="registered objectives (see `dtprobe list`)")
    sw.add_argument("--seeds", nargs="+", type=int, default=[0])
    sw.add_argument("--out", required=True, help="sweep directory (one sub-directory per run)")
    sw.add_argument("--metrics", nargs="+", default=None,
                    help="metrics to analyse (default: the default set)")
    sw.add_argument("--param", action="append", metavar="OBJECTIVE:KEY=VALUE",
                    help="parameter for one objective only, repeatable "
                         "(e.g. dropout:keep_prob=0.5)")
    _add_train_args(sw, sweep=True)
    _add_analysis_parsers(sub)
    return parser
    return parser


def _add_train_args(t: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The ``dtprobe train`` flags (``dtprobe sweep`` passes them through to every run)."""
    _add_data_args(t, "shapes")
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
    if not sweep:
        t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="save and exit after this epoch (continue later with --resume)")
    t.add_argument("--no-progress", action="store_true")
    if not sweep:
        t.add_argument("--analyze-every", type=int, default=None, metavar="N",
                       help="analyse the run while it trains, in a background process at the "
                            "lowest CPU priority, once every N new checkpoints (on the CPU; log in "
                            f"OUT/{'analyze_watch.log'})")
    obj = t.add_argument_group("objective and schedule")
    if not sweep:
        obj.add_argument("--objective", default=None, metavar="NAME",
                         help="training objective (see `dtprobe list`); default ce")
        obj.add_argument("--objective-param", action="append", metavar="KEY=VALUE",
                         help="objective hyperparameter, repeatable (e.g. alpha=0.2)")
    obj.add_argument("--schedule", default="default", choices=["default", "reference"],
                     help="default: warm-up + one cosine; reference: the CTC code's two-phase "
                          "schedule (cosine to S, restart at 0.1 lr), for every objective")
    obj.add_argument("--switch-epoch", type=int, default=None, metavar="S",
                     help="last epoch of stage 1 of --schedule reference (default: CTC's S, "
                          "else 2/3 of --epochs)")
    obj.add_argument("--stage1-weight-decay", type=float, default=None,
                     help="weight decay in stage 1 of --schedule reference (default 1e-3)")
    ctc = t.add_argument_group("CTC (contrastive temporal coding, Cui et al. 2022)")
    if not sweep:
        ctc.add_argument("--ctc", action="store_true", help="short for --objective ctc")
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


def _add_analysis_parsers(sub) -> None:
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
    w = a.add_argument_group("live analysis (a run still training)")
    w.add_argument("--watch", action="store_true",
                   help="follow the run: analyse each new complete checkpoint, update the table "
                        "and charts, exit when the manifest says training finished (or Ctrl-C)")
    w.add_argument("--report", default=None, metavar="FILE",
                   help="with --watch: also rewrite this HTML report after each update")
    w.add_argument("--poll", type=float, default=5.0, help="with --watch: seconds between looks")
    w.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --watch: stop after this long without a new checkpoint")
    w.add_argument("--every", type=int, default=1, metavar="N",
                   help="with --watch: analyse once N new checkpoints are complete")

    ex = sub.add_parser("export", help="export an analysed run's metrics to other tools")
    ex.add_argument("runs", nargs="+", help="analysed run directories")
    ex.add_argument("--tensorboard", required=True, metavar="DIR",
                    help="write the per-epoch metrics as TensorBoard scalars into DIR")
    ex.add_argument("--x", choices=["auto", "step", "epoch"], default="auto",
                    help="x axis of the scalars (auto: steps when every row has one)")

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

    sub.add_parser("list", help="list architectures, datasets, metrics and objectives")


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
        ctc=ctc if name == "ctc" else {}, schedule=args.schedule,
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


def cmd_train(args: argparse.Namespace) -> int:
    from dtprobe.training.trainer import train

    cfg = _train_config(args)
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
    from dtprobe.errors import ConfigError
    from dtprobe.sweep import run_sweep

    per_objective: dict[str, dict[str, Any]] = {}
    for item in args.param or []:
        if ":" not in item:
            raise ConfigError(f"--param expects OBJECTIVE:KEY=VALUE, got {item!r}")
        name, kv = item.split(":", 1)
        per_objective.setdefault(name, {}).update(_parse_kv([kv], "--param"))
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
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dtprobe.analysis import analyze

    if args.watch:
        return _watch(args)
    if args.report is not None:
        from dtprobe.errors import ConfigError

        raise ConfigError("--report goes with --watch; for a finished run use "
                          "`dtprobe report RUN -o FILE`")
    results = analyze(args.run_dir, **_analyze_kwargs(args))
    return _finish_analyze(args, results)


def _analyze_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(metrics=args.metrics, device=args.device, arch=args.arch,
                num_classes=args.num_classes,
                arch_params=_parse_kv(args.arch_param, "--arch-param") or None,
                dataset=args.dataset, dataset_params=_dataset_params(args) or None,
                pattern=args.pattern, compare=args.compare, layers=args.layers,
                batch_size=args.batch_size, use_cache=not args.no_cache,
                progress=not args.no_progress, plot=not args.no_plot, seed=args.seed,
                wait=not args.no_wait, follow_symlinks=args.follow_symlinks,
                downstream=args.downstream, downstream_metrics=args.downstream_metrics)


def _watch(args: argparse.Namespace) -> int:
    from dtprobe.analysis.watch import watch

    results = watch(args.run_dir, poll=args.poll, idle_timeout=args.idle_timeout,
                    report=args.report, every=args.every, **_analyze_kwargs(args))
    if results is None:
        print(f"dtprobe analyze --watch: no checkpoint appeared in {args.run_dir}")
        return 0
    return _finish_analyze(args, results)


def _finish_analyze(args: argparse.Namespace, results) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
    from dtprobe.export import export_tensorboard
    from dtprobe.results import load_results

    n = export_tensorboard(load_results(args.runs), args.tensorboard, x=args.x)
    print(f"{n} scalars written to {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dtprobe.plotting import save_all_figures
    from dtprobe.results import load_results
    from dtprobe.sweep import expand_sweeps

    paths = save_all_figures(load_results(expand_sweeps(args.runs)), args.out,
                             formats=tuple(args.format))
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dtprobe.report import write_report
    from dtprobe.results import load_results
    from dtprobe.sweep import expand_sweeps

    out = write_report(load_results(expand_sweeps(args.runs)), args.output)
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
    from dtprobe.training.objectives import available_objectives

    print("objectives (--objective NAME, --objective-param KEY=VALUE):")
    for name, spec in available_objectives().items():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "-"
        print(f"  {name:16s} {spec.description}")
        print(f"  {'':16s}   paper: {spec.paper}; defaults: {defaults}")
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "analyze": cmd_analyze, "plot": cmd_plot,
            "report": cmd_report, "demo": cmd_demo, "list": cmd_list, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from checkpoints_manifest import ManifestError
    from dtprobe.errors import DtprobeError

    for stream in (sys.stdout, sys.stderr):  # undecodable file names must not crash a print
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
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
