"""Write dtprobe manifests from the training code people already run.

A run whose ``manifest.json`` names every checkpoint (epoch, step, file, sha256, how to rebuild
the model) is analysed with no flags: ``dtprobe analyze RUN``. These integrations write that
manifest as the framework saves checkpoints:

- :class:`~dtprobe.integrations.lightning.ManifestModelCheckpoint`: PyTorch Lightning's
  ``ModelCheckpoint`` that also records each file it writes (``pip install dtprobe[lightning]``);
- :class:`~dtprobe.integrations.huggingface.ManifestCallback`: a Hugging Face ``TrainerCallback``
  that records each ``checkpoint-STEP/`` the ``Trainer`` saves (``pip install
  dtprobe[huggingface]``);
- :class:`~dtprobe.integrations.loop.CheckpointRecorder`: three lines for a plain training loop
  (no dependency beyond torch and safetensors).

The framework modules import their framework lazily, so ``import dtprobe.integrations`` never
needs it; using one without its package raises an ``ImportError`` that names the extra to
install.
"""

from dtprobe.integrations.loop import CheckpointRecorder, ensure_manifest

__all__ = ["CheckpointRecorder", "ensure_manifest"]
