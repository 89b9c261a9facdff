"""Per-epoch diagnostics as pure functions, one family per module.

=====================  ==========================================================
family                 functions
=====================  ==========================================================
accuracy               :func:`top1_accuracy`
separation             :func:`class_separation` (Kornblith et al. 2021)
collapse               :func:`neural_collapse` (Papyan, Han, Donoho 2020)
cka                    :func:`linear_cka`, :func:`rbf_cka`, :func:`cka_matrix`,
                       :class:`MinibatchCKA` (Kornblith 2019; Nguyen et al. 2021)
information            :func:`mutual_information` and one function per estimator
probes                 :func:`linear_probe`, :func:`knn_probe` (Kornblith et al. 2019)
transferability        :func:`logme`, :func:`h_score`, :func:`transrate`, :func:`gbc`,
                       :func:`leep`, :func:`nce_score`
spectrum               :func:`rankme` (Garrido et al. 2023)
=====================  ==========================================================

Importing this package registers every analysis adapter (see :mod:`dtprobe.metrics.registry`).
"""

from dtprobe.metrics.accuracy import top1_accuracy
from dtprobe.metrics.cka import MinibatchCKA, cka_matrix, linear_cka, rbf_cka
from dtprobe.metrics.collapse import neural_collapse
from dtprobe.metrics.information import (
    MIResult,
    binning_mi,
    infonce_mi,
    kde_mi,
    ksg_mi,
    mine_mi,
    mutual_information,
    renyi_mi,
)
from dtprobe.metrics.probes import LinearProbe, ProbeResult, knn_probe, linear_probe
from dtprobe.metrics.separation import class_separation
from dtprobe.metrics.spectrum import rankme
from dtprobe.metrics.transferability import gbc, h_score, leep, logme, nce_score, transrate

__all__ = [
    "LinearProbe", "MIResult", "MinibatchCKA", "ProbeResult", "class_separation", "cka_matrix",
    "gbc", "h_score", "knn_probe", "leep", "linear_cka", "linear_probe", "logme",
    "mutual_information", "nce_score", "renyi_mi", "kde_mi", "binning_mi", "ksg_mi", "mine_mi",
    "infonce_mi", "neural_collapse", "rankme", "rbf_cka", "top1_accuracy",
    "transrate",
]
