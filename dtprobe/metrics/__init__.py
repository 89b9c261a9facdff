"""Per-epoch diagnostics as pure functions, one family per module.

=====================  ==========================================================
family                 functions
=====================  ==========================================================
accuracy               :func:`top1_accuracy`
separation             :func:`class_separation` (Kornblith et al. 2021)
collapse               :func:`neural_collapse` (Papyan, Han, Donoho 2020), :func:`cdnv`
                       (Galanti et al. 2022), :func:`class_mean_uniformity`
                       (Wang & Isola 2020)
intrinsic              :func:`twonn` (Facco et al. 2017; Ansuini et al. 2019)
neighbours             :func:`mutual_knn`, :func:`cknna` (Huh et al. 2024)
shape                  :func:`procrustes_distance`, :func:`angular_shape_metric`
                       (Williams et al. 2021)
cca                    :func:`svcca` (Raghu et al. 2017), :func:`pwcca` (Morcos et al. 2018)
cka                    :func:`linear_cka`, :func:`rbf_cka`, :func:`cka_matrix`,
                       :class:`MinibatchCKA` (Kornblith 2019; Nguyen et al. 2021),
                       :func:`cka_permutation_null` (chance level of CKA)
information            :func:`mutual_information` and one function per estimator
fewshot                :func:`fewshot_accuracy` (closed-form ridge, nearest class mean;
                       Islam et al. 2021, big_vision)
probes                 :func:`linear_probe`, :func:`knn_probe` (Kornblith et al. 2019)
transferability        :func:`logme`, :func:`h_score`, :func:`transrate`, :func:`gbc`,
                       :func:`leep`, :func:`nce_score`, :func:`nleep` (Li et al. 2021)
spectrum               :func:`rankme` (Garrido et al. 2023), :func:`alpha_req`
                       (Agrawal et al. 2022), :func:`numerical_rank`
=====================  ==========================================================

Importing this package registers every analysis adapter (see :mod:`dtprobe.metrics.registry`).
Similarity measures (CKA, mutual k-NN, CKNNA, shape metrics, SVCCA, PWCCA) are registered with
their direction (larger = more similar, or a distance) and invariances
(:func:`dtprobe.metrics.registry.register_similarity`).
"""

from dtprobe.metrics.accuracy import top1_accuracy
from dtprobe.metrics.cca import pwcca, svcca
from dtprobe.metrics.cka import (
    CKANull,
    MinibatchCKA,
    cka_matrix,
    cka_permutation_null,
    linear_cka,
    rbf_cka,
)
from dtprobe.metrics.collapse import cdnv, class_mean_uniformity, neural_collapse
from dtprobe.metrics.fewshot import fewshot_accuracy
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
from dtprobe.metrics.intrinsic import twonn
from dtprobe.metrics.neighbours import cknna, mutual_knn
from dtprobe.metrics.probes import LinearProbe, ProbeResult, knn_probe, linear_probe
from dtprobe.metrics.separation import class_separation
from dtprobe.metrics.shape import angular_shape_metric, procrustes_distance
from dtprobe.metrics.spectrum import alpha_req, numerical_rank, rankme
from dtprobe.metrics.transferability import gbc, h_score, leep, logme, nce_score, nleep, transrate

__all__ = [
    "LinearProbe", "MIResult", "MinibatchCKA", "ProbeResult", "class_separation", "cka_matrix",
    "gbc", "h_score", "knn_probe", "leep", "linear_cka", "linear_probe", "logme",
    "mutual_information", "nce_score", "renyi_mi", "kde_mi", "binning_mi", "ksg_mi", "mine_mi",
    "infonce_mi", "neural_collapse", "rankme", "rbf_cka", "top1_accuracy",
    "transrate", "twonn", "alpha_req", "numerical_rank", "cdnv", "class_mean_uniformity",
    "mutual_knn", "cknna", "procrustes_distance", "angular_shape_metric", "svcca", "pwcca",
    "nleep", "cka_permutation_null", "CKANull", "fewshot_accuracy",
]
