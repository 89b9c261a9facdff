"""Architectures, by name. Importing this package registers the built-in ones."""

from dtprobe.models import (  # noqa: F401  (registration)
    ctc_resnext,
    hf_models,
    resnext_cifar,
    small_cnn,
    timm_models,
    torchvision_resnet,
)
from dtprobe.models.registry import (
    ArchGuess,
    ArchSpec,
    KeyMap,
    available_archs,
    build_model,
    get_arch,
    guess_arch,
    head_module,
    head_name,
    register_arch,
)

__all__ = ["ArchGuess", "ArchSpec", "KeyMap", "available_archs", "build_model", "get_arch",
           "guess_arch", "head_module", "head_name", "register_arch"]
