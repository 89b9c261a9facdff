"""Data: the evaluation dataset decoded once and reused for every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtprobe.analysis.plan import RunPlan
from dtprobe.data import DatasetBundle, load_dataset
from dtprobe.extract import dataset_key

MAX_MI_INPUTS = 2000  # test images whose flattened pixels are kept as X for I(X;T)


@dataclass
class EvalData:
    """The dataset decoded once and reused for every checkpoint."""

    bundle: DatasetBundle
    key: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    mi_inputs: torch.Tensor


def place_images(bundle: DatasetBundle, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and test images where extraction reads them fastest."""
    train_images, test_images = bundle.train.images, bundle.test.images
    if device.type == "cuda":
        # Resident on the GPU when they fit in a quarter of free memory (no copies per
        # checkpoint); pinned host memory otherwise, for overlapped transfers.
        free = torch.cuda.mem_get_info(device)[0]
        size = train_images.nbytes + test_images.nbytes
        move = (lambda t: t.to(device)) if size < free // 4 else (lambda t: t.pin_memory())
        train_images, test_images = move(train_images), move(test_images)
    return train_images, test_images


def prepare_data(plan: RunPlan, device: torch.device) -> EvalData:
    bundle = load_dataset(plan.dataset, **plan.dataset_params)
    train_images, test_images = place_images(bundle, device)
    # X for I(X;T): the first test images' pixels; MI adapters pair them with the first rows of
    # the test features, so these must stay the leading rows.
    n_mi = min(MAX_MI_INPUTS, len(bundle.test))
    return EvalData(bundle, dataset_key(bundle.name, bundle.params), train_images, test_images,
                    bundle.test.images[:n_mi].flatten(1))

