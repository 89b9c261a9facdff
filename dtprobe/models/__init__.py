"""Architectures, by name. Importing this package registers the built-in ones."""

from dtprobe.models import small_cnn, torchvision_resnet  # noqa: F401  (registration)
from dtprobe.models.registry import (
    ArchSpec,
    available_archs,
    build_model,
    get_arch,
    head_module,
    register_arch,
)

__all__ = ["ArchSpec", "available_archs", "build_model", "get_arch", "head_module", "register_arch"]
