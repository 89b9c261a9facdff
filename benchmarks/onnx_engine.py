"""CPU extraction with ONNX Runtime (``engine="onnx"``) against eager and the naive loop.

The setting of :mod:`benchmarks.extraction` (a seeded ``small_cnn`` series, embedded
``shapes`` data, float32 on the CPU), with three paths timed side by side in one run:

- naive: the DataLoader + ``create_feature_extractor`` loop of
  :func:`benchmarks.extraction.naive_extract` (the baseline of the issue's 2x goal);
- eager: ``extract_features(..., engine="eager")``, dtprobe's default;
- onnx: ``extract_features(..., engine="onnx")``: per checkpoint the folded inference copy
  is exported (``torch.onnx.export``), loaded into an ONNX Runtime session and checked
  against eager on the first images; the timing includes all of it.

Eager and onnx load each checkpoint file once and extract both splits from it, as
``dtprobe analyze`` does (the onnx engine exports once per checkpoint, not per split). The
export cost (export + session creation, from :func:`dtprobe.features.engines.onnx.export_stats`) is
reported per checkpoint. The outputs must agree to float rounding.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from benchmarks import Row, timed
from benchmarks.extraction import (
    TOLERANCE,
    NormalisingDataset,
    _max_rel_diff,
    make_checkpoints,
    naive_extract,
    workload,
)
from dtprobe.features.extract import auto_batch_size, extract_features
from dtprobe.models import build_model

NAME = "extraction of E checkpoints (CPU, float32, engine onnx)"
VS_EAGER = "engine onnx vs engine eager (CPU, float32)"


def engine_extract(path: Path, arch_kwargs: dict, num_classes: int,
                   splits: dict[str, torch.Tensor], engine: str) -> dict:
    """Both splits of one checkpoint with ``extract_features(engine=engine)``."""
    model = build_model("small_cnn", num_classes, **arch_kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return {s: extract_features(model, model.fc, x, device=torch.device("cpu"),
                                batch_size="auto", engine=engine) for s, x in splits.items()}


def run(quick: bool = False) -> list[Row]:
    n_ckpt, params, arch_kwargs, bundle, splits = workload(quick)
    n_img = sum(v.shape[0] for v in splits.values())
    batch = auto_batch_size(splits["train"], torch.device("cpu"))
    sizes = (f"E={n_ckpt}, small_cnn{' (width 8)' if quick else ''}, shapes {n_img:,} images "
             f"at {params['image_size']} px, batch {batch}")
    if importlib.util.find_spec("onnxruntime") is None:
        note = "skipped: onnxruntime is not installed (pip install 'dtprobe[onnx]')"
        return [Row(name=NAME, sizes=sizes, goal=2, skipped=True, note=note),
                Row(name=VS_EAGER, sizes=sizes, skipped=True, note=note)]
    from dtprobe.features.engines.onnx import export_stats, reset_export_stats

    mean = torch.tensor(bundle.mean)[None, :, None, None]
    std = torch.tensor(bundle.std)[None, :, None, None]
    datasets = {k: NormalisingDataset((v * std + mean).float(), bundle.mean, bundle.std)
                for k, v in splits.items()}
    k = bundle.num_classes
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(Path(tmp), n_ckpt, arch_kwargs, k)
        few = {"test": splits["test"][:16]}
        # warm-up of every path (the first export also initialises the tracer and onnxruntime)
        for engine in ("eager", "onnx"):
            engine_extract(paths[0], arch_kwargs, k, few, engine)
        naive_extract(paths[0], arch_kwargs, k, NormalisingDataset(
            datasets["test"].raw[:16], bundle.mean, bundle.std), batch)

        def ours(engine: str):
            return [engine_extract(p, arch_kwargs, k, splits, engine) for p in paths]

        def naive():
            return [{s: naive_extract(p, arch_kwargs, k, ds, batch) for s, ds in datasets.items()}
                    for p in paths]

        repeat = 1 if quick else 2  # best of two: the machine is shared
        reset_export_stats()
        onnx_s, a = timed(lambda: ours("onnx"), repeat)
        stats = export_stats()
        eager_s, b = timed(lambda: ours("eager"), repeat)
        base_s, c = timed(naive, repeat)
    worst_naive, _ = _max_rel_diff(a, c)
    worst_eager, _ = _max_rel_diff(a, b)
    fell_back = stats["fallbacks"] > 0
    exports = max(1, int(stats["exports"]))
    per_ckpt = stats["export_seconds"] / exports
    rate = n_ckpt * n_img
    rates = (f"{rate / onnx_s:.0f} (onnx) vs {rate / eager_s:.0f} (eager) vs "
             f"{rate / base_s:.0f} (naive) images/s")
    cost = (f"export + session creation {per_ckpt * 1000:.0f} ms per checkpoint "
            f"({exports} exports, {stats['reused']:.0f} calls reusing one; "
            f"{per_ckpt * n_ckpt / onnx_s:.0%} of the onnx time)")
    if fell_back:
        cost += f"; {stats['fallbacks']:.0f} calls FELL BACK to eager"
    return [
        Row(name=NAME, sizes=sizes, ours=onnx_s, base=base_s, goal=2,
            baseline="DataLoader + create_feature_extractor per checkpoint",
            agreement=f"max rel diff {worst_naive:.1e} (tol {TOLERANCE:g})",
            agree_ok=worst_naive <= TOLERANCE and not fell_back,
            note=f"{rates}; {cost}; all include loading each checkpoint file"),
        Row(name=VS_EAGER, sizes=sizes, ours=onnx_s, base=eager_s,
            baseline="extract_features(engine='eager')",
            agreement=f"max rel diff {worst_eager:.1e} (tol {TOLERANCE:g})",
            agree_ok=worst_eager <= TOLERANCE and not fell_back,
            note="same checkpoints, both splits per loaded checkpoint; onnx includes its "
                 "export"),
    ]
