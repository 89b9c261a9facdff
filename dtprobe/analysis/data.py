"""Data: the evaluation dataset decoded once and reused for every checkpoint.

Folder datasets are decoded once into an image store (``--image-store``, default
:func:`dtprobe.data.store.default_store_dir`) and streamed per batch; the others are made in
memory. ``--max-samples`` keeps a stable subset (:mod:`dtprobe.data.subsets`) and
``--memory-budget`` is checked here, before the first checkpoint (:mod:`.memory`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtprobe.analysis.memory import batch_bytes, check_budget, default_budget
from dtprobe.analysis.plan import AnalysisOptions, RunPlan
from dtprobe.data import DatasetBundle, load_dataset
from dtprobe.data.pixels import is_raw
from dtprobe.data.registry import supports_store
from dtprobe.data.store import default_store_dir
from dtprobe.data.subsets import sample_ids_digest
from dtprobe.features.cache import dataset_key

MAX_MI_INPUTS = 2000  # test images whose flattened pixels are kept as X for I(X;T)


@dataclass
class EvalData:
    """The dataset decoded once and reused for every checkpoint.

    ``store`` is the image-store folder (None: in memory), ``budget`` the memory budget in
    bytes and ``max_samples`` the subset size, which downstream datasets inherit.
    """

    bundle: DatasetBundle
    key: str
    train_images: Any
    test_images: Any
    mi_inputs: torch.Tensor | None  # None: made on first use (see :meth:`mi`)
    store: Path | None = None
    budget: int | None = None
    max_samples: int | None = None
    #: Floats extracted per image (features, logits, layers), measured by ``check_model``.
    values_per_image: int = 0
    #: Bytes of every module's output per image, the model's weights and the images per
    #: forward pass on the host (0 on a GPU), measured by ``check_model`` for the budget.
    activations_per_image: int = 0
    model_bytes: int = 0
    host_batch: int = 0
    #: ``--skip-bad-images``, which downstream folder datasets inherit.
    skip_bad_images: bool = False
    #: ``--progress``: progress bars (an image store's build among them), inherited likewise.
    progress: bool = True

    def mi(self) -> torch.Tensor:
        """X for I(X;T): the first test images' pixels, flattened (made once, when an MI
        metric first asks; MI adapters pair them with the leading rows of the test features)."""
        if self.mi_inputs is None:
            n_mi = min(MAX_MI_INPUTS, len(self.bundle.test))
            self.mi_inputs = self.bundle.test.images[:n_mi].flatten(1).cpu()
        return self.mi_inputs

    def row_settings(self) -> dict[str, Any]:
        """Settings stamped on the ``params`` of every row measured on these images: the
        evaluation transform of a folder dataset (``"eval_transform"``), and the subset's
        sizes and ids digest (``"samples"``) when ``--max-samples`` chose one or files were
        skipped (``skip_bad_images``)."""
        out: dict[str, Any] = {}
        transform = eval_transform_setting(self.bundle)
        if transform:
            out["eval_transform"] = transform
        if self.max_samples is not None or self.bundle.skipped:
            out["samples"] = self.samples_tag
        return out

    def samples(self) -> dict[str, Any]:
        """Size and digest of each split's sample ids (what ``--max-samples`` chose)."""
        out: dict[str, Any] = {"dataset": self.key}
        for name, split in (("train", self.bundle.train), ("test", self.bundle.test)):
            ids = split.sample_ids or []
            out[name] = {"n": len(split), "sample_ids_sha256": sample_ids_digest(ids)}
        return out

    @functools.cached_property
    def samples_tag(self) -> str:
        """``N_TRAIN+N_TEST:DIGEST`` of both splits, stamped on rows of a subset analysis."""
        ids = (self.bundle.train.sample_ids or []) + ["|"] + (self.bundle.test.sample_ids or [])
        return f"{len(self.bundle.train)}+{len(self.bundle.test)}:{sample_ids_digest(ids)}"


def accepts(dataset: str, param: str) -> bool:
    """Whether the loader of ``dataset`` takes ``param``."""
    from dtprobe.data.spec import loader_parameters

    return param in loader_parameters(dataset)


def eval_transform_setting(bundle: DatasetBundle) -> str:
    """``"resize=R,crop=C"`` of a folder dataset (:mod:`dtprobe.data.decode`'s rule), else
    empty (array datasets have no evaluation transform to choose)."""
    if not supports_store(bundle.name) or "image_size" not in bundle.params:
        return ""
    crop = bundle.params.get("image_size")
    if crop is None:
        return ""
    text = f"resize={bundle.params.get('resize_size') or crop},crop={crop}"
    interpolation = bundle.params.get("interpolation")
    return text if interpolation in (None, "bilinear") else f"{text},{interpolation}"


def resident_bytes(images: Any) -> int:
    """Host bytes ``images`` hold (0 for an image store or images on a GPU)."""
    if images.device.type != "cpu":
        return 0
    return int(images.nbytes)


def place_images(bundle: DatasetBundle, device: torch.device) -> tuple[Any, Any]:
    """The train and test images where extraction reads them fastest."""
    train_images, test_images = bundle.train.images, bundle.test.images
    if device.type == "cuda":
        # Resident on the GPU when they fit in a quarter of free memory (no copies per
        # checkpoint; uint8 pixels are a quarter the size); pinned host memory otherwise, for
        # overlapped transfers (an image store is streamed through pinned staging buffers).
        free = torch.cuda.mem_get_info(device)[0]
        size = sum(t.pixel_shape.numel() if is_raw(t) else t.shape.numel() * t.element_size()
                   for t in (train_images, test_images))
        if size < free // 4:
            train_images, test_images = train_images.to(device), test_images.to(device)
        elif not is_raw(train_images):
            train_images, test_images = train_images.pin_memory(), test_images.pin_memory()
    return train_images, test_images


def store_folder(opts: AnalysisOptions, dataset: str) -> Path | None:
    """Where ``dataset`` is decoded once (``--image-store``), or None to decode into memory."""
    choice = opts.image_store
    if choice is None or str(choice).lower() == "none" or not supports_store(dataset):
        return None
    return default_store_dir() if str(choice) == "auto" else Path(choice).expanduser()


def enforce_budget(data: EvalData, values_per_image: int, what: str,
                   pixel_inputs: bool = False, held_value_bytes: int = 4) -> int:
    """:func:`~dtprobe.analysis.memory.check_budget` for ``data`` (see there);
    ``pixel_inputs``: an I(X;T) metric will hold :meth:`EvalData.mi` too."""
    budget = data.budget if data.budget is not None else default_budget()
    resident = resident_bytes(data.train_images) + resident_bytes(data.test_images)
    if pixel_inputs:
        resident += min(MAX_MI_INPUTS, len(data.bundle.test)) * 4 * int(
            torch.Size(data.bundle.test.images.shape[1:]).numel())
    images = data.bundle.test.images
    pixels = images.pixel_shape[1:] if is_raw(images) else images.shape[1:]
    batch = batch_bytes(min(data.host_batch, max(len(data.bundle.train), len(data.bundle.test))),
                        pixels, images.shape[1:], data.activations_per_image)
    return check_budget(budget, len(data.bundle.train), len(data.bundle.test), values_per_image,
                        resident, what, can_store=supports_store(data.bundle.name)
                        and data.store is None, held_value_bytes=held_value_bytes,
                        batch=batch, model=data.model_bytes)


def prepare_data(plan: RunPlan, device: torch.device,
                 opts: AnalysisOptions | None = None) -> EvalData:
    opts = opts or AnalysisOptions()
    params = dict(plan.dataset_params)
    if opts.max_samples is not None:
        params["max_samples"] = opts.max_samples
    if opts.skip_bad_images and accepts(plan.dataset, "skip_bad_images"):
        params["skip_bad_images"] = True
    store = store_folder(opts, plan.dataset)
    bundle = load_dataset(plan.dataset, store=store, progress=opts.progress, **params)
    train_images, test_images = place_images(bundle, device)
    return EvalData(bundle, dataset_key(bundle.name, bundle.params), train_images, test_images,
                    None, store=store, budget=opts.memory_budget,
                    max_samples=opts.max_samples, skip_bad_images=opts.skip_bad_images,
                    progress=opts.progress)


def samples_record(data: EvalData) -> str:
    """JSON of :meth:`EvalData.samples` plus the ids themselves (``analysis/samples.json``)."""
    record = data.samples()
    record["train"]["sample_ids"] = data.bundle.train.sample_ids
    record["test"]["sample_ids"] = data.bundle.test.sample_ids
    record["skipped"] = data.bundle.skipped
    return json.dumps(record) + "\n"
