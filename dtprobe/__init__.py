"""dtprobe: temporal representation diagnostics for checkpoint series.

Measures the discriminability-transferability trade-off (Kornblith et al. 2021;
Cui et al. 2022) across the checkpoints of a training run.
"""

__version__ = "0.1.0"
