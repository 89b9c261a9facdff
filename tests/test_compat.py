"""Old import paths of the modules moved in the 0.2 layout keep working (dtprobe.compat)."""

import importlib
import sys

import pytest

import dtprobe  # noqa: F401  (installs the finder)
from dtprobe.compat import MOVED_MODULES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_path_is_the_new_module_with_a_warning(old):
    new = importlib.import_module(MOVED_MODULES[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED_MODULES[old]):
        module = importlib.import_module(old)
    assert module is new
    assert sys.modules[old] is new


def test_from_import_through_an_old_path():
    from dtprobe.extract import FeatureCache, extract_features, inference_model  # noqa: F401

    from dtprobe.features.extract import extract_features as new

    assert extract_features is new


@pytest.mark.parametrize("package, names", [
    ("dtprobe.checkpoints", ["KNOWN_NAMINGS", "TEMP_SUFFIXES", "WRAPPER_KEYS", "PREFIXES",
                             "CheckpointSeries", "InferredCheckpoint", "LoadedCheckpoint",
                             "ALLOWED_DTYPES", "CheckpointBytes", "check_finite", "check_tensors",
                             "infer_checkpoint_series", "infer_run", "is_temporary_name",
                             "load_checkpoint", "load_into_model", "load_weights",
                             "load_state_dict", "read_checkpoint_bytes", "read_checkpoint_meta",
                             "resolve_inside", "safe_torch_load", "verify_sha256"]),
    ("dtprobe.plotting", ["plot_tradeoff", "plot_metrics", "plot_information_plane", "plot_cka",
                          "plot_cka_grid", "plot_cka_to_final", "plot_tradeoff_over_epochs",
                          "plot_transfer_tradeoff", "plot_tradeoff_by_task", "iter_figures",
                          "save_all_figures", "style", "palette", "run_colors", "task_colors",
                          "epoch_ticks", "chance_levels", "EPOCH_CMAP", "TASK_PALETTE"]),
    ("dtprobe.results", ["Results", "load_results", "compare", "kendall_tau",
                         "score_rank_correlation", "transfer_table", "read_cka_matrix",
                         "METRIC_INFO", "TABLE_COLUMNS", "FAILURE_COLUMNS", "ANALYSIS_DIR"]),
    ("dtprobe.training.objectives", ["Objective", "ObjectiveContext", "ObjectiveSpec",
                                     "CrossEntropyObjective", "register_objective",
                                     "available_objectives", "get_objective", "build_objective",
                                     "check_positive", "check_range", "safe_normalize"]),
])
def test_packages_keep_the_former_module_names(package, names):
    module = importlib.import_module(package)
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing
