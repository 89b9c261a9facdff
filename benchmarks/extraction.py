"""Feature extraction over E checkpoints: dtprobe's engine against the naive loop.

Both extract the penultimate features and logits of the train and test splits of the
embedded ``shapes`` data for every checkpoint of a ``small_cnn`` series (weights read from
``.pt`` files with ``torch.load(weights_only=True)`` and loaded into a freshly built model in
both cases).

- dtprobe: the images are decoded and normalised once; per checkpoint
  ``dtprobe.features.extract.extract_features`` (inference mode, BatchNorm folded into the convs,
  channels-last, preallocated outputs, ``batch_size="auto"``).
- naive: what analysis scripts usually do: a ``torch.utils.data.DataLoader`` over a
  ``Dataset`` whose ``__getitem__`` normalises each image, and a torchvision
  ``create_feature_extractor`` built for every checkpoint, under ``torch.no_grad``, with
  per-batch outputs concatenated at the end. It gets the same batch size as dtprobe chose.

The outputs must agree to float rounding (folding changes rounding only). The penultimate
layer is the one Kornblith et al. (2021) and Cui et al. (2022) analyse.

References
----------
Kornblith, S., Chen, T., Lee, H., Norouzi, M. (2021). Why do better loss functions lead to
less transferable features? NeurIPS 2021.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks import Row, timed
from dtprobe.data import load_dataset
from dtprobe.data.base import DatasetBundle
from dtprobe.features.extract import auto_batch_size, extract_features
from dtprobe.models import build_model

TOLERANCE = 1e-4  # max abs difference relative to the largest absolute output
BF16_TOLERANCE = 5e-2  # bf16 keeps 8 significant bits; errors accumulate over 8 convs


class NormalisingDataset(Dataset):
    """Raw [0, 1] images, normalised per item in ``__getitem__`` (the usual transform)."""

    def __init__(self, raw: torch.Tensor, mean, std):
        self.raw = raw
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.raw[i] - self.mean) / self.std


def naive_extract(path: Path, arch_kwargs: dict, num_classes: int, dataset: Dataset,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """One checkpoint the usual way: DataLoader + torchvision feature extractor."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = build_model("small_cnn", num_classes, **arch_kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    extractor = create_feature_extractor(model, return_nodes={"embed": "features",
                                                              "fc": "logits"})
    feats, logits = [], []
    with torch.no_grad():
        for x in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            out = extractor(x)
            feats.append(out["features"].cpu())
            logits.append(out["logits"].cpu())
    return {"features": torch.cat(feats), "logits": torch.cat(logits)}


def dtprobe_extract(path: Path, arch_kwargs: dict, num_classes: int, images: torch.Tensor,
                    amp: bool = False) -> dict[str, torch.Tensor]:
    """One checkpoint with dtprobe's engine (``amp``: the opt-in bf16 autocast)."""
    model = build_model("small_cnn", num_classes, **arch_kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return extract_features(model, model.fc, images, device=torch.device("cpu"),
                            batch_size="auto", amp=amp)


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 matrix units (AMX or AVX-512-BF16) that make bf16 pay."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _max_rel_diff(a: list, b: list) -> tuple[float, float]:
    """Largest |a - b| / max|b| over checkpoints, splits and outputs; top-1 agreement."""
    worst, agree, total = 0.0, 0, 0
    for fa, fb in zip(a, b, strict=True):
        for split in fa:
            for key in ("features", "logits"):
                x, y = fa[split][key], fb[split][key]
                worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
            agree += int((fa[split]["logits"].argmax(1) == fb[split]["logits"].argmax(1)).sum())
            total += fa[split]["logits"].shape[0]
    return worst, agree / max(1, total)


def make_checkpoints(root: Path, n_ckpt: int, arch_kwargs: dict, num_classes: int
                     ) -> list[Path]:
    """A seeded series of small_cnn state dicts with non-trivial BatchNorm statistics."""
    paths = []
    for e in range(n_ckpt):
        torch.manual_seed(e)
        model = build_model("small_cnn", num_classes, **arch_kwargs)
        gen = torch.Generator().manual_seed(100 + e)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        path = root / f"epoch_{e:04d}.pt"
        torch.save(model.state_dict(), path)
        paths.append(path)
    return paths


def workload(quick: bool) -> tuple[int, dict, dict, DatasetBundle, dict[str, torch.Tensor]]:
    """The extraction benchmarks' sizes: checkpoints, shapes parameters, small_cnn arguments,
    the dataset and its two splits' images (``quick``: the smoke-test sizes)."""
    if quick:
        n_ckpt, params, arch_kwargs = 2, {"n_train": 200, "n_test": 100, "image_size": 16}, \
            {"width": 8, "feature_dim": 16}
    else:
        n_ckpt, params, arch_kwargs = 4, {"n_train": 2000, "n_test": 1000, "image_size": 32}, {}
    bundle = load_dataset("shapes", **params)
    splits = {"train": bundle.train.images, "test": bundle.test.images}
    return n_ckpt, params, arch_kwargs, bundle, splits


def run(quick: bool = False) -> list[Row]:
    n_ckpt, params, arch_kwargs, bundle, splits = workload(quick)
    # the naive loop starts from raw [0, 1] pixels and normalises per item
    mean = torch.tensor(bundle.mean)[None, :, None, None]
    std = torch.tensor(bundle.std)[None, :, None, None]
    raw = {k: (v * std + mean).float() for k, v in splits.items()}
    datasets = {k: NormalisingDataset(v, bundle.mean, bundle.std) for k, v in raw.items()}
    batch = auto_batch_size(splits["train"], torch.device("cpu"))
    k = bundle.num_classes
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(Path(tmp), n_ckpt, arch_kwargs, k)
        # warm-up of both paths on a few images
        dtprobe_extract(paths[0], arch_kwargs, k, splits["test"][:16])
        naive_extract(paths[0], arch_kwargs, k, NormalisingDataset(raw["test"][:16], bundle.mean,
                                                                   bundle.std), batch)

        def ours(amp: bool = False):
            return [{s: dtprobe_extract(p, arch_kwargs, k, x, amp) for s, x in splits.items()}
                    for p in paths]

        def naive():
            return [{s: naive_extract(p, arch_kwargs, k, ds, batch) for s, ds in datasets.items()}
                    for p in paths]

        bf16 = cpu_has_bf16()
        if bf16:
            dtprobe_extract(paths[0], arch_kwargs, k, splits["test"][:16], amp=True)
        repeat = 1 if quick else 2  # best of two: the machine is shared
        ours_s, a = timed(ours, repeat)
        base_s, b = timed(naive, repeat)
        bf16_s, c = timed(lambda: ours(True), repeat) if bf16 else (None, None)
    worst, _ = _max_rel_diff(a, b)
    n_img = sum(v.shape[0] for v in splits.values())
    sizes = (f"E={n_ckpt}, small_cnn{' (width 8)' if quick else ''}, shapes {n_img:,} images "
             f"at {params['image_size']} px, batch {batch}")
    label = "DataLoader + create_feature_extractor per checkpoint"
    rows = [Row(
        name="extraction of E checkpoints (CPU, float32)", sizes=sizes,
        ours=ours_s, base=base_s, goal=2, baseline=label,
        agreement=f"max rel diff {worst:.1e} (tol {TOLERANCE:g})", agree_ok=worst <= TOLERANCE,
        note=(f"{n_ckpt * n_img / ours_s:.0f} vs {n_ckpt * n_img / base_s:.0f} images/s; "
              "both include loading each checkpoint file"))]
    name = "extraction of E checkpoints (CPU, opt-in bf16)"
    if c is None:
        rows.append(Row(name=name, sizes=sizes, goal=2, baseline=label, skipped=True,
                        note="skipped: this CPU has no bf16 matrix units (AMX/AVX-512-BF16)"))
    else:
        worst16, top1 = _max_rel_diff(c, b)
        rows.append(Row(
            name=name, sizes=sizes, ours=bf16_s, base=base_s, goal=2, baseline=label,
            agreement=f"max rel diff {worst16:.1e} (tol {BF16_TOLERANCE:g})",
            agree_ok=worst16 <= BF16_TOLERANCE,
            note=("extract_features(..., amp=True): bf16 autocast on the CPU (AMX), opt-in "
                  "because outputs carry bf16 rounding; the baseline stays float32; top-1 "
                  f"class unchanged for {top1:.1%} of images (random-weight checkpoints have "
                  "near-tied logits)")))
    return rows
