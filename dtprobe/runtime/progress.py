"""Progress bars: :func:`tqdm.auto.tqdm`, without its warning in kernels that lack ipywidgets.

In a Jupyter kernel without ipywidgets, importing ``tqdm.auto`` warns "IProgress not found"
(a ``TqdmWarning``) and falls back to the text bar. The text bar is what dtprobe wants there
anyway, so the warning is silenced here, once, for every module that shows progress.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*IProgress not found.*")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
