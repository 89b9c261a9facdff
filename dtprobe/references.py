"""The papers dtprobe's module docstrings cite, each written once, and their References sections.

A module ends its imports with ``__doc__ = with_references(__doc__, "kornblith2021", ...)``,
which appends the numpydoc ``References`` section built from :data:`PAPERS`, so ``help()``,
Sphinx and numpydoc read the full citations while a paper's authors, title and venue are
stated here alone (they had drifted apart: three modules gave Cui et al. 2022 other authors).
A key may come with a note, ``("cui2022", "(CIFAR-100 source, CINIC-10 target)")``, which
follows the citation.

A leaf module (standard library only), importable from every layer of dtprobe.
``checkpoints_manifest`` depends on the standard library only and keeps its own citations.
"""

from __future__ import annotations

import textwrap

__all__ = ["PAPERS", "references_section", "with_references"]

#: Citation of every paper a module docstring cites, by key (first author, year, and a word where
#: one author has two papers in a year); rendered without the final full stop.
PAPERS: dict[str, str] = {
    # the trade-off itself
    "kornblith2021": 'S. Kornblith, T. Chen, H. Lee, M. Norouzi, "Why Do Better Loss Functions '
                     'Lead to Less Transferable Features?", NeurIPS 2021',
    "cui2022": 'Q. Cui, B. Zhao, Z.-M. Chen, B. Zhao, R. Song, J. Liang, B. Zhou, O. Yoshie, '
               '"Discriminability-Transferability Trade-Off: An Information-Theoretic '
               'Perspective", ECCV 2022',
    # representations, probes and transfer
    "kornblith2019cka": 'S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural '
                        'Network Representations Revisited", ICML 2019',
    "kornblith2019transfer": 'S. Kornblith, J. Shlens, Q. V. Le, "Do Better ImageNet Models '
                             'Transfer Better?", CVPR 2019',
    "islam2021": 'A. Islam, C.-F. Chen, R. Panda, L. Karlinsky, R. Radke, R. Feris, "A Broad '
                 'Study on the Transferability of Visual Representations with Contrastive '
                 'Learning", ICCV 2021',
    "caron2021": 'M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", '
                 'ICCV 2021',
    "kumar2022": 'A. Kumar, A. Raghunathan, R. Jones, T. Ma, P. Liang, "Fine-Tuning can Distort '
                 'Pretrained Features and Underperform Out-of-Distribution", ICLR 2022',
    "kolesnikov2020": 'A. Kolesnikov, L. Beyer, X. Zhai et al., "Big Transfer (BiT): General '
                      'Visual Representation Learning", ECCV 2020',
    "rifkin2007": 'R. M. Rifkin, R. A. Lippert, "Notes on Regularized Least Squares", '
                  'MIT-CSAIL-TR-2007-025',
    "wang2019": 'Y. Wang, W.-L. Chao, K. Q. Weinberger, L. van der Maaten, "SimpleShot: '
                'Revisiting Nearest-Neighbor Classification for Few-Shot Learning", '
                'arXiv:1911.04623',
    # training objectives
    "wu2018": 'Z. Wu, Y. Xiong, S. X. Yu, D. Lin, "Unsupervised Feature Learning via '
              'Non-Parametric Instance Discrimination", CVPR 2018',
    "tian2020": 'Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", '
                'ICLR 2020',
    "khosla2020": 'P. Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020',
    "chen2020": 'T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for '
                'Contrastive Learning of Visual Representations", ICML 2020',
    "hui2021": 'L. Hui, M. Belkin, "Evaluation of Neural Architectures Trained with Square Loss '
               'vs Cross-Entropy in Classification Tasks", ICLR 2021',
    "sariyildiz2023": 'M. B. Sariyildiz, Y. Kalantidis, K. Alahari, D. Larlus, "No Reason for No '
                      'Supervision: Improved Generalization in Supervised Models", ICLR 2023',
    # architectures and data sets
    "xie2017": 'S. Xie, R. Girshick, P. Dollar, Z. Tu, K. He, "Aggregated Residual '
               'Transformations for Deep Neural Networks", CVPR 2017',
    "alpaydin1998": 'E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI '
                    'Machine Learning Repository, 1998',
    "krizhevsky2009": 'A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", '
                      '2009',
    "darlow2018": 'L. N. Darlow et al., "CINIC-10 is not ImageNet or CIFAR-10", '
                  'arXiv:1810.03505, 2018',
    "coates2011": 'A. Coates, A. Ng, H. Lee, "An Analysis of Single-Layer Networks in '
                  'Unsupervised Feature Learning", AISTATS 2011',
    # transferability estimators
    "you2021": 'K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained '
               'Models for Transfer Learning", ICML 2021',
    "bao2019": 'Y. Bao, Y. Li, S.-L. Huang, L. Zhang, L. Zheng, A. Zamir, L. Guibas, "An '
               'Information-Theoretic Approach to Transferability in Task Transfer Learning", '
               'ICIP 2019',
    "ibrahim2022": 'S. Ibrahim, N. Ponomareva, R. Mazumder, "Newer is not always better: '
                   'Rethinking transferability metrics, their peculiarities, stability and '
                   'performance", ECML-PKDD 2022',
    "huang2022": 'L.-K. Huang, J. Huang, Y. Rong, Q. Yang, Y. Wei, "Frustratingly Easy '
                 'Transferability Estimation", ICML 2022',
    "pandy2022": 'M. Pándy, A. Agostinelli, J. Uijlings, V. Ferrari, T. Mensink, '
                 '"Transferability Estimation using Bhattacharyya Class Separability", CVPR 2022',
    "nguyen2020": 'C. V. Nguyen, T. Hassner, M. Seeger, C. Archambeau, "LEEP: A New Measure to '
                  'Evaluate Transferability of Learned Representations", ICML 2020',
    "tran2019": 'A. T. Tran, C. V. Nguyen, T. Hassner, "Transferability and Hardness of '
                'Supervised Classification Tasks", ICCV 2019',
    "ledoit2004": 'O. Ledoit, M. Wolf, "A well-conditioned estimator for large-dimensional '
                  'covariance matrices", J. Multivariate Analysis 88(2), 2004',
    "li2021": 'Y. Li, X. Jia, R. Sang, Y. Zhu, B. Green, L. Wang, B. Gong, "Ranking Neural '
              'Checkpoints", CVPR 2021',
}

#: Width of the rendered lines (the project's line length less a margin for indentation).
_WIDTH = 96

Entry = str | tuple[str, str]


def references_section(*entries: Entry) -> str:
    """The numpydoc ``References`` section citing ``entries`` in order, ``.. [1]`` first.

    Parameters
    ----------
    *entries : str or (str, str)
        Keys of :data:`PAPERS`, each alone or with a note that follows its citation (a note
        starting with ``;`` or ``,`` is joined without a space).

    Returns
    -------
    str
        ``"References\\n----------\\n.. [1] ...\\n"``, each entry closed by a full stop (not
        after a link) and wrapped to 96 columns with its continuation lines indented by three
        spaces (numpydoc's layout).

    Raises
    ------
    KeyError
        A key that :data:`PAPERS` lacks (at import of the citing module, so a typo cannot pass).
    """
    lines = ["References", "----------"]
    for number, entry in enumerate(entries, start=1):
        key, note = (entry, "") if isinstance(entry, str) else entry
        if key not in PAPERS:
            raise KeyError(f"dtprobe.references: no paper {key!r} in PAPERS; add it there")
        text = PAPERS[key] + (note if note[:1] in (";", ",") else f" {note}" if note else "")
        if not text.split()[-1].startswith("http"):  # no full stop glued to a link
            text += "."
        lines.append(textwrap.fill(text, _WIDTH, initial_indent=f".. [{number}] ",
                                   subsequent_indent="   ", break_long_words=False,
                                   break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def with_references(doc: str | None, *entries: Entry) -> str | None:
    """``doc`` followed by :func:`references_section` of ``entries``.

    ``None`` (docstrings stripped by ``python -OO``) stays ``None``; the keys are checked
    either way.
    """
    section = references_section(*entries)
    return None if doc is None else doc.rstrip() + "\n\n" + section
