"""Architectures, by name. Importing this package registers the built-in ones."""

from dtprobe.models import (  # noqa: F401  (registration)
    ctc_resnext,
    resnext_cifar,
    small_cnn,
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
