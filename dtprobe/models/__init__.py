"""Architectures, by name. Importing this package registers the built-in ones."""

from dtprobe.models import (  # noqa: F401  (registration)
    resnext_cifar,
    small_cnn,
    torchvision_resnet,
)
from dtprobe.models.registry import (
    ArchSpec,
    available_archs,
    build_model,
    get_arch,
    head_module,
    register_arch,
)

__all__ = ["ArchSpec", "available_archs", "build_model", "get_arch", "head_module", "register_arch"]
