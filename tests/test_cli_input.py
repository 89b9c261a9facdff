"""Bad input on the command line (issue 16, section 3): every numeric option, output path and
name is checked before any work, with one line on stderr and exit status 2; help texts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtprobe import cli
from dtprobe.names import builtin_names, check_metric_names, check_name

# (command prefix, option, bad values): every numeric option of every subcommand
NUMERIC = [
    (["train", "--out", "{tmp}/r"], "--epochs", ["0", "-1", "2.5", "x"]),
    (["train", "--out", "{tmp}/r"], "--batch-size", ["0", "-3", "many"]),
    (["train", "--out", "{tmp}/r"], "--lr", ["0", "-0.1", "nan", "inf", "fast"]),
    (["train", "--out", "{tmp}/r"], "--momentum", ["-0.1", "1", "1.5", "nan"]),
    (["train", "--out", "{tmp}/r"], "--weight-decay", ["-1e-4", "nan"]),
    (["train", "--out", "{tmp}/r"], "--warmup-epochs", ["-1", "0.5"]),
    (["train", "--out", "{tmp}/r"], "--save-every", ["0", "-2"]),
    (["train", "--out", "{tmp}/r"], "--seed", ["-1", "1.5"]),
    (["train", "--out", "{tmp}/r"], "--stop-after", ["0", "-1"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--stage-two-epoch", ["-1", "x"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--alpha", ["-0.5", "nan"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--beta", ["-1", "inf"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--tau1", ["0", "-0.1", "nan"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--tau2", ["0", "-1"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--m1", ["1", "-0.1"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--m2", ["1.0", "2"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--nce-k", ["0", "-5"]),
    (["train", "--out", "{tmp}/r", "--ctc"], "--proj-dim", ["0", "1.5"]),
    (["analyze", "{tmp}"], "--batch-size", ["0", "-1", "big"]),
    (["analyze", "{tmp}"], "--num-classes", ["1", "0", "-2"]),
    (["analyze", "{tmp}"], "--seed", ["-1"]),
    (["demo", "--out", "{tmp}/d"], "--epochs", ["0", "1", "-4"]),
    (["demo", "--out", "{tmp}/d"], "--seed", ["-1"]),
    (["demo", "--out", "{tmp}/d"], "--threads", ["0", "-2"]),
]
CASES = [(prefix, opt, bad) for prefix, opt, bads in NUMERIC for bad in bads]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("prefix", "option", "bad"), CASES,
                         ids=[f"{p[0]}{o}={b}" for p, o, b in CASES])
def test_numeric_option_rejected_in_one_line(prefix, option, bad, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in prefix] + [f"{option}={bad}"]
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert option in lines[0] and repr(bad) in lines[0] and "expected" in lines[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("value,expected", [("1", 1), ("30", 30)])
def test_positive_int_accepts(value, expected):
    assert cli.positive_int(value) == expected


def test_type_functions_bounds():
    assert cli.unit_interval("0") == 0.0 and cli.unit_interval("0.99") == 0.99
    assert cli.nonnegative_float("0") == 0.0 and cli.positive_float("1e-8") == 1e-8
    assert cli._batch_size("auto") == "auto" and cli._batch_size("64") == 64
    for fn, bad in [(cli.positive_int, "1e3"), (cli.unit_interval, "1"),
                    (cli.positive_float, "-inf"), (cli.nonnegative_int, "-0.0")]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


@pytest.mark.parametrize("argv,needle", [
    (["--stop-after", "5", "--epochs", "3"], "--stop-after 5 is past --epochs 3"),
    (["--warmup-epochs", "4", "--epochs", "3"], "--warmup-epochs 4 exceeds --epochs 3"),
    (["--ctc", "--stage-two-epoch", "9", "--epochs", "3"], "stage 2 would never start"),
])
def test_inconsistent_train_options(argv, needle, tmp_path, capsys):
    code, _, err = _run(["train", "--out", str(tmp_path / "r"), *argv], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ output paths
def _unwritable_dir(tmp_path: Path) -> Path | None:
    """A folder this process cannot write in (None when running as root, which can)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        ro.chmod(0o700)
        return None
    return ro


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: a path below it can never be created."""
    f = tmp_path / "file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("make_argv", [
    lambda bad: ["train", "--out", str(bad / "run"), "--epochs", "1"],
    lambda bad: ["plot", str(bad.parent), "--out", str(bad / "charts")],
    lambda bad: ["report", str(bad.parent), "-o", str(bad / "r.html")],
    lambda bad: ["demo", "--out", str(bad / "demo")],
], ids=["train", "plot", "report", "demo"])
def test_output_path_under_a_file(make_argv, blocker, capsys):
    code, out, err = _run(make_argv(blocker), capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "not a folder" in err and str(blocker) in err
    assert "Traceback" not in err and out == ""


def test_output_path_in_read_only_folder(tmp_path, capsys):
    ro = _unwritable_dir(tmp_path)
    if ro is None:
        pytest.skip("running as root: every folder is writable")
    try:
        for argv in (["train", "--out", str(ro / "run")],
                     ["plot", str(tmp_path), "--out", str(ro / "c")],
                     ["report", str(tmp_path), "-o", str(ro / "r.html")]):
            code, _, err = _run(argv, capsys)
            assert code == 2 and "cannot write in" in err and len(err.strip().splitlines()) == 1
    finally:
        ro.chmod(0o700)


def test_report_output_is_a_folder(tmp_path, capsys):
    code, _, err = _run(["report", str(tmp_path), "-o", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err


def test_analyze_read_only_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "analysis").write_text("not a folder")
    code, _, err = _run(["analyze", str(run), "--device", "cpu"], capsys)
    assert code == 2 and "analysis" in err and len(err.strip().splitlines()) == 1


def test_os_error_after_the_checks_is_one_line(tmp_path, capsys, monkeypatch):
    def boom(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.png"))

    monkeypatch.setitem(cli.COMMANDS, "plot", boom)
    code, _, err = _run(["plot", str(tmp_path), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"dtprobe plot: error: {tmp_path / 'x.png'}: Permission denied")


# ------------------------------------------------------------------ names, before torch
def test_builtin_names_match_the_registries():
    from dtprobe.data import available_datasets
    from dtprobe.metrics.registry import available_metrics
    from dtprobe.models import available_archs

    assert builtin_names("dataset") == tuple(available_datasets())
    assert builtin_names("architecture") == tuple(available_archs())
    assert builtin_names("metric") == tuple(available_metrics())


@pytest.mark.parametrize("name,kind,hint", [("shapez", "dataset", "'shapes'"),
                                            ("cifar-10", "dataset", "'cifar10'"),
                                            ("small-cnn", "architecture", "'small_cnn'"),
                                            ("resnet19", "architecture", "'resnet18'")])
def test_unknown_names_suggest(name, kind, hint):
    from dtprobe.errors import ConfigError

    with pytest.raises(ConfigError, match=f"did you mean {hint}"):
        check_name(name, kind, "--x")
    check_name("timm:resnet50", "architecture", "--arch")  # checked when built
    check_name(None, kind, "--x")


def test_unknown_metric_suggests():
    from dtprobe.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'probe_accuracy'"):
        check_metric_names(["probe_acuracy", "rankme"])
    check_metric_names(["default", "all", "rankme"])


@pytest.mark.parametrize("argv", [
    ["train", "--out", "{tmp}/r", "--dataset", "shapez"],
    ["train", "--out", "{tmp}/r", "--arch", "smallcnn"],
    ["analyze", "{tmp}", "--dataset", "cifar11"],
    ["analyze", "{tmp}", "--metrics", "probe_acc"],
])
def test_typo_reported_before_torch_is_imported(argv, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = ("import sys; from dtprobe.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, rc)")
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    assert "did you mean" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ help
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_defaults_are_shown():
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if shown and action.option_strings and action.option_strings[0] != "-h":
                assert f"(default: {action.default})" in " ".join(text.split()), \
                    (name, action.dest)


def test_top_level_help_is_plain_text():
    text = cli.build_parser().format_help()
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    assert "exit status" in text and "dtprobe analyze" in text


def test_analyze_help_says_what_and_where():
    text = " ".join(_subparsers(cli.build_parser())["analyze"].format_help().split())
    for needle in ("metrics.csv", "cka_matrix.csv", "tradeoff.png", "class separation",
                   "linear-probe", "RUN_DIR/analysis"):
        assert needle in text, needle


# ------------------------------------------------------------------ lock files
def _count_under_lock(analysis_dir: str, n: int) -> None:
    from dtprobe.analysis.locks import run_lock

    counter = Path(analysis_dir) / "counter"
    for _ in range(n):
        with run_lock(Path(analysis_dir)):
            value = int(counter.read_text()) if counter.exists() else 0
            time.sleep(0.001)  # widen the read-modify-write window
            counter.write_text(str(value + 1))


def test_run_lock_removed_on_release_and_still_exclusive(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_count_under_lock, args=(str(tmp_path), 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert (tmp_path / "counter").read_text() == "40"  # no update lost
    assert not (tmp_path / ".lock").exists()


def test_shared_run_lock_kept_until_the_last_holder_leaves(tmp_path):
    import contextlib

    from dtprobe.analysis.locks import run_lock
    from dtprobe.errors import RunBusyError

    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first.enter_context(run_lock(tmp_path, shared=True))
    second.enter_context(run_lock(tmp_path, shared=True))
    first.close()
    assert (tmp_path / ".lock").exists()  # the other worker still holds it
    with pytest.raises(RunBusyError):
        with run_lock(tmp_path, wait=False):
            pass
    second.close()
    assert not (tmp_path / ".lock").exists()
    with run_lock(tmp_path, wait=False):
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()
