"""Features: from a model and images to feature tensors, cached and sealed.

- :mod:`~dtprobe.features.extract`: model preparation for inference and batched extraction
  (penultimate features and layer taps), with the automatic batch size;
- :mod:`~dtprobe.features.engines`: the eager engine and the optional ONNX Runtime one;
- :mod:`~dtprobe.features.integrity`: cache seals (HMAC with a per-user key).
"""
