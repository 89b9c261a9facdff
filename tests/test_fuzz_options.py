"""Parsers of user text, fuzzed (issue 25, part 4).

Dataset specs (``DATASET:KEY=VALUE,...``), ``--memory-budget``, ``--max-samples``, ``--layers``,
``--objective-param KEY=VALUE``, ``--param OBJECTIVE:KEY=VALUE`` and the sweep's settings:
every input either works or is one line (exit 2), never a traceback.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtprobe.analysis.memory import MAX_BUDGET, parse_size
from dtprobe.cli import _parse_kv, main
from dtprobe.data.spec import DownstreamSpec, parse_downstream
from dtprobe.errors import ConfigError, DtprobeError

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FUZZ_CLI = settings(FUZZ, max_examples=80)  # each example runs the whole command line
#: JSON-ish values as a user types them: numbers of any size, nesting, junk.
_ATOMS = st.one_of(
    st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "1e999", "-1e999", "NaN", "Infinity", "9" * 5000,
                     "[" * 5000, "{" * 3000 + "}" * 3000, "\"\\ud800\"", "0x10", "", " ", "=",
                     ",", ":", "1_000", "١٢", "\x00", "\n"]),
    st.text(max_size=12))
_VALUES = st.one_of(_ATOMS, st.lists(_ATOMS, max_size=3).map(lambda v: "[" + ",".join(v) + "]"))


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text.strip() and "Traceback" not in text, text


_REFUSED = object()


def _parse_or_one_line(parse, *args):
    """``parse(*args)``, or :data:`_REFUSED` after checking its ConfigError is one line."""
    try:
        return parse(*args)
    except ConfigError as exc:
        _one_line(exc)
        return _REFUSED


# ------------------------------------------------------------------------ dataset specs
_DATASETS = st.sampled_from(["digits", "textures", "imagefolder", "cinic10", "shapes", "nosuch",
                             "", " digits", "digits:", "DIGITS"])
_KEYS = st.sampled_from(["root", "n_train", "n_test", "seed", "image_size", "max_per_class",
                         "max_samples", "name", "download", "noise", "", "x", "name "])
_SPECS = st.one_of(
    st.text(max_size=40),
    st.builds(lambda d, items: d + (":" + ",".join(f"{k}={v}" for k, v in items) if items
                                    else ""),
              _DATASETS, st.lists(st.tuples(_KEYS, _VALUES), max_size=4)))


@FUZZ
@given(_SPECS)
def test_dataset_specs_parse_or_are_one_line(text):
    spec = _parse_or_one_line(parse_downstream, text)
    if spec is _REFUSED:
        return
    assert isinstance(spec, DownstreamSpec)
    assert parse_downstream(spec.text) == spec  # the canonical text reads back the same


# ------------------------------------------------------------------------ sizes, numbers
_SIZES = st.one_of(
    st.text(max_size=12),
    st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(), st.floats().map(repr),
                                                st.just("9" * 400), st.just("1" * 5000)),
              st.sampled_from(["", "k", "M", "G", "T", "GiB", "gb", " M", "P", "MB "])))


@FUZZ
@given(_SIZES)
def test_memory_budget_parses_or_is_one_line(text):
    value = _parse_or_one_line(parse_size, text)
    if value is _REFUSED:
        return
    assert isinstance(value, int) and (1 << 20) <= value <= MAX_BUDGET


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=10), st.builds(lambda k, v: f"{k}={v}",
                                                          st.text(max_size=6), _VALUES)),
                max_size=3))
def test_key_value_options_parse_or_are_one_line(items):
    out = _parse_or_one_line(_parse_kv, items, "--objective-param")
    if out is _REFUSED:
        return
    assert isinstance(out, dict) and len(out) <= len(items)


def _cli(capsys, argv: list[str]) -> int:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
    return code


@FUZZ_CLI
@given(st.one_of(st.text(max_size=12), st.integers().map(str), st.just("9" * 5000)),
       st.one_of(_SIZES, st.just("auto")))
def test_scale_options_on_the_command_line(capsys, tmp_path_factory, max_samples, budget):
    missing = tmp_path_factory.getbasetemp() / "no-such-run"
    code = _cli(capsys, ["analyze", str(missing), "--device", "cpu", "--no-progress",
                         "--max-samples", max_samples, "--memory-budget", budget])
    assert code == 2


# ------------------------------------------------------- objectives: --objective-param
@pytest.fixture(scope="module")
def objective_context():
    from dtprobe.models import build_model
    from dtprobe.models.registry import get_arch, head_module
    from dtprobe.training.objectives import ObjectiveContext

    model = build_model("small_cnn", 4, width=4, feature_dim=8)
    return ObjectiveContext(model=model, head=head_module(model, "small_cnn"), feature_dim=8,
                            num_classes=4, num_samples=32,
                            train_labels=torch.arange(32) % 4, device=torch.device("cpu"),
                            seed=0, epochs=4, feature_fn=lambda m, x: x.flatten(1)[:, :8],
                            refresh_batches=lambda: iter(()),
                            head_name=get_arch("small_cnn").head)


def _objective_params():
    from dtprobe.training.objectives import available_objectives

    specs = available_objectives()
    # values of every type and size, except positive integers beyond a few dozen: how large a
    # projection or bank may be is each objective's own range check (a million-wide layer is
    # a valid, slow request), not the parser's
    values = st.one_of(_VALUES.filter(lambda v: not v.isdigit() or len(v) > 12),
                       st.integers(-3, 64).map(str))
    return st.sampled_from(sorted(specs)).flatmap(lambda name: st.tuples(
        st.just(name),
        st.lists(st.tuples(st.sampled_from(sorted(specs[name].defaults) + ["bogus"]), values),
                 max_size=3)))


@FUZZ
@given(_objective_params())
def test_objective_params_build_or_are_one_line(objective_context, case):
    from dtprobe.training.objectives import build_objective

    name, items = case
    try:
        params = _parse_kv([f"{k}={v}" for k, v in items], "--objective-param")
        build_objective(name, objective_context, params)
    except DtprobeError as exc:
        _one_line(exc)


@FUZZ_CLI
@given(st.lists(st.one_of(st.text(max_size=16),
                          st.builds(lambda o, k, v: f"{o}:{k}={v}",
                                    st.sampled_from(["ce", "supcon", "nosuch", "", "ce "]),
                                    st.text(max_size=6), _VALUES)), min_size=1, max_size=2),
       st.lists(st.sampled_from(["ce", "label_smoothing", "nosuch", ""]), min_size=1,
                max_size=2),
       st.lists(st.sampled_from(["0", "1", "-1", "x", "9" * 5000]), min_size=1, max_size=2))
def test_sweep_settings_are_checked_before_training(capsys, tmp_path_factory, monkeypatch,
                                                    params, objectives, seeds):
    from dtprobe.training import sweep

    ran = []
    monkeypatch.setattr(sweep, "run_sweep", lambda configs, *a, **k: ran.append(configs)
                        or (_ for _ in ()).throw(ConfigError("stop: settings accepted")))
    out = tmp_path_factory.getbasetemp() / "sweep-out"
    argv = ["sweep", "--out", str(out), "--objectives", *objectives, "--seeds", *seeds,
            "--epochs", "1", "--device", "cpu", "--no-progress"]
    for p in params:
        argv += ["--param", p]
    assert _cli(capsys, argv) == 2
    for configs in ran:  # accepted settings: every --param names a swept objective
        for (name, _seed), cfg in configs.items():
            assert name in objectives
            json.dumps(cfg.objective_params)


def test_repeated_downstream_flags_add_up():
    from dtprobe.cli import build_parser

    args = build_parser().parse_args(["analyze", "run", "--downstream", "digits", "--downstream",
                                      "textures", "imagefolder:root=/x"])
    assert args.downstream == ["digits", "textures", "imagefolder:root=/x"]
    assert build_parser().parse_args(["analyze", "run"]).downstream == []
