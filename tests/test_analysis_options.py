"""One analysis's options are built once (AnalysisOptions.build) and passed down unchanged:
the command line and the Python API give the same object, specs are parsed and the device
resolved there, and nothing downstream parses or resolves them again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import dtprobe.data.spec as spec_module
from dtprobe.analysis import analyze
from dtprobe.analysis.downstream import downstream_specs
from dtprobe.analysis.plan import PLAN_FLAGS, AnalysisOptions
from dtprobe.cli import _analysis_options, build_parser
from dtprobe.data.spec import DownstreamSpec
from dtprobe.errors import ConfigError


def _source(*tasks):
    """Just what downstream_specs reads of the source data: its tasks."""
    return SimpleNamespace(bundle=SimpleNamespace(factor_classes={t: 3 for t in tasks}))


def test_build_converts_parses_and_resolves_once():
    opts = AnalysisOptions.build(metrics=("source_accuracy",), device="cpu", layers=("auto",),
                                 compare=[__file__], downstream=["digits:name=d2"],
                                 memory_budget="2M", fewshot_shots=["1", 5], image_store=None,
                                 dataset="shapes", arch_params={"width": 4})
    assert opts.metrics == ["source_accuracy"] and opts.layers == ["auto"]
    assert opts.compare == [str(__file__)]
    assert opts.device == torch.device("cpu")
    assert opts.downstream == [DownstreamSpec("digits", {}, "d2")]
    assert opts.memory_budget == 2 << 20 and opts.fewshot_shots == (1, 5)
    assert opts.image_store is None
    assert opts.plan_flags == {"dataset": "shapes", "arch_params": {"width": 4}}
    assert opts.resolved() is opts  # already built: never parsed or resolved again


def test_built_specs_are_not_parsed_again_downstream(monkeypatch):
    opts = AnalysisOptions.build(device="cpu", downstream=["digits", "textures:name=tx"])

    def refuse(*_):
        raise AssertionError("a downstream spec was parsed a second time")

    monkeypatch.setattr(spec_module, "parse_downstream", refuse)
    assert downstream_specs(opts, _source("shape")) is opts.downstream
    with pytest.raises(ConfigError, match="name 'digits' is also a task of the source"):
        downstream_specs(opts, _source("digits"))


def test_options_made_by_hand_are_resolved_by_the_pipeline():
    opts = AnalysisOptions(device="cpu", downstream=["digits"]).resolved()
    assert opts.device == torch.device("cpu")
    assert opts.downstream == [DownstreamSpec("digits", {}, "digits")]


def test_bad_options_are_refused_when_built():
    with pytest.raises(ConfigError, match="--downstream"):
        AnalysisOptions.build(downstream=["digits", "digits"])
    with pytest.raises(ConfigError, match="invalid --device"):
        AnalysisOptions.build(device="tpu:9")
    with pytest.raises(TypeError, match="unexpected analysis option.*colour"):
        AnalysisOptions.build(colour="blue")
    with pytest.raises(TypeError, match="unexpected analysis option.*plan_flags"):
        AnalysisOptions.build(plan_flags={})  # set by build itself, never by a caller


def test_analyze_takes_options_or_keywords_not_both(tmp_path):
    opts = AnalysisOptions.build(device="cpu")
    with pytest.raises(TypeError, match="either options= or the option keywords"):
        analyze(tmp_path, options=opts, seed=3)


def test_command_line_and_python_api_build_the_same_options(tmp_path):
    argv = ["analyze", str(tmp_path), "--device", "cpu", "--metrics", "source_accuracy",
            "--dataset", "shapes", "--dataset-param", "n_train=64", "--arch-param",
            "width=4", "--downstream", "digits", "--memory-budget", "1G", "--seed", "3",
            "--no-progress", "--no-plot", "--fewshot-draws", "2", "--weights", "ema"]
    from_cli = _analysis_options(build_parser().parse_args(argv))
    from_api = AnalysisOptions.build(
        metrics=["source_accuracy"], device="cpu", dataset="shapes",
        dataset_params={"n_train": 64}, arch_params={"width": 4}, downstream=["digits"],
        memory_budget="1G", seed=3, progress=False, plot=False, fewshot_draws=2,
        weights="ema")
    for name in PLAN_FLAGS:  # the CLI names every flag; the API only those given
        from_api.plan_flags.setdefault(name, from_cli.plan_flags[name])
    assert from_cli == from_api
