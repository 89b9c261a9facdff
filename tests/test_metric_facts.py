"""Each metric's facts are declared once and every registered metric has them."""

import pytest

from dtprobe.metrics.registry import available_metrics, available_similarities, register_similarity
from dtprobe.table import METRIC_INFO, SIMILARITY_INFO, metric_info, similarity_rows


def test_every_registered_metric_declares_rows_with_presentation_facts():
    specs = available_metrics()
    assert specs
    for name, spec in specs.items():
        assert spec.rows, name
        missing = [row for row in spec.rows if row not in METRIC_INFO]
        assert not missing, f"{name}: no dtprobe.table.METRIC_INFO entry for {missing}"


def test_similarity_direction_comes_from_the_one_declaration():
    sims = available_similarities()
    assert set(sims) <= set(SIMILARITY_INFO)
    for name, spec in sims.items():
        label, _range, higher = SIMILARITY_INFO[name]
        assert spec.similarity.higher_is_similar is higher
        assert spec.similarity.row_params()["higher_is_similar"] is higher
        assert spec.rows == similarity_rows(name)
        for row in spec.rows:
            if name != "linear_cka":  # cka_to_* keep their own labels (no "best")
                assert metric_info(row).higher_is_better is higher
                assert metric_info(row).label.startswith(label)


def test_a_contradicting_direction_is_refused():
    with pytest.raises(ValueError, match="contradicts"):
        register_similarity("procrustes_distance", invariances=("orthogonal",),
                            higher_is_similar=True)


def test_an_undeclared_similarity_must_say_its_direction():
    with pytest.raises(ValueError, match="higher_is_similar"):
        register_similarity("not_declared_anywhere", invariances=("orthogonal",))
