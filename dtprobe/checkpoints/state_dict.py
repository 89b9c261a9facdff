"""Find the model's weights inside a checkpoint: a documented search, accepted only on an exact fit.

Training frameworks nest the weights under different keys and prefix their names with the
attributes that wrapped the network. Rather than guessing one unwrapping, :func:`resolve`
enumerates *candidates* and accepts one only when its keys and shapes fit the freshly built
model exactly (BatchNorm ``num_batches_tracked`` counters may be absent), so a wrong guess can
never load. The search, in order (the first fitting candidate wins):

1. **Nesting.** The file's top level, then mappings below it (depth <= 3), known keys first:
   :data:`NESTING_KEYS` (``model``, ``state_dict``, ``net``, ``model_state_dict``, ``module``,
   then the EMA keys :data:`EMA_KEYS`: ``state_dict_ema``, ``model_ema`` ...), then any other
   key in file order. Optimiser, scheduler, scaler, callback and hyper-parameter entries
   (:data:`SKIPPED_KEYS`) are never searched.
2. **Bookkeeping.** Counters that are not weights (:data:`BOOKKEEPING_KEYS`: ``n_averaged`` of
   ``torch.optim.swa_utils.AveragedModel``) are dropped; their presence marks EMA weights.
3. **Prefixes.** ``--strip-prefix P`` first keeps only the keys starting with ``P`` and removes
   it. Then, repeatedly (depth <= 4): a first name component shared by every key is stripped
   (``module.`` of DDP/DataParallel, ``_orig_mod.`` of ``torch.compile``, ``model.``/``net.``/
   ``timm_model.`` or any LightningModule attribute), and where the keys have several first
   components, each component's keys form a candidate of their own (a LightningModule holding
   ``net`` and ``ema_net``, or a loss with buffers).
4. **Renames.** The architecture's :class:`~dtprobe.models.registry.KeyMap` rules (e.g. the CTC
   paper's ResNet-18 names), after the candidate as it is.

``weights`` chooses among fitting candidates: ``"auto"`` (default) the raw weights, or the EMA
weights when the file holds only those; ``"raw"``, ``"ema"``; or a key / prefix name
(``--weights state_dict_ema``, ``--weights ema_net``) naming where the weights are. A candidate
is EMA when its nesting key or stripped prefix has an ``ema``/``swa``/``averaged`` token or it
carries ``n_averaged``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from dtprobe.errors import CheckpointError

__all__ = ["BOOKKEEPING_KEYS", "EMA_KEYS", "NESTING_KEYS", "SKIPPED_KEYS", "Candidate",
           "candidates", "key_list", "mismatch_message", "resolve", "tensor_dicts"]

#: Keys that hold the raw weights, tried first, in this order.
RAW_KEYS: tuple[str, ...] = ("model", "state_dict", "net", "model_state_dict", "module",
                             "network", "weights", "params")
#: Keys that hold averaged (EMA/SWA) weights.
EMA_KEYS: tuple[str, ...] = ("state_dict_ema", "model_ema", "ema_state_dict", "ema",
                             "ema_model", "model_ema_state_dict", "ema_params", "swa_model",
                             "averaged_model")
NESTING_KEYS: tuple[str, ...] = RAW_KEYS + EMA_KEYS
#: Top-level entries that never hold the model (optimiser moments have parameter shapes).
SKIPPED_KEYS: frozenset[str] = frozenset({
    "optimizer", "optimizer_states", "optimizer_state_dict", "optim", "opt", "lr_scheduler",
    "lr_schedulers", "scheduler", "scaler", "grad_scaler", "callbacks", "loops",
    "hyper_parameters", "hparams", "args", "config", "amp", "rng_state", "random_states"})
#: Non-weight entries some wrappers keep among the weights.
BOOKKEEPING_KEYS: frozenset[str] = frozenset({"n_averaged"})
_EMA_TOKEN = re.compile(r"(^|[_.])(ema|swa|averaged)([_.]|$)", re.IGNORECASE)
_MAX_NESTING, _MAX_STRIPS = 3, 4


@dataclass(frozen=True)
class Candidate:
    """One possible reading of the weights in a checkpoint.

    Attributes
    ----------
    where : tuple of str
        Nesting keys descended through (``()`` for the top level).
    stripped : tuple of str
        Prefixes removed from every key, in order (e.g. ``("_orig_mod.", "module.")``).
    ema : bool
        Whether these are averaged (EMA/SWA) weights.
    key_map : str or None
        Name of the architecture's rename map applied, if any.
    state : dict of str to Tensor
        The weights under the model's names.
    """

    where: tuple[str, ...]
    stripped: tuple[str, ...]
    ema: bool
    key_map: str | None
    state: dict[str, Tensor]

    def describe(self) -> str:
        where = "/".join(self.where) if self.where else "the top level"
        parts = [f"weights at {where}"]
        if self.stripped:
            parts.append("prefix " + "".join(self.stripped) + " stripped")
        if self.key_map:
            parts.append(f"names renamed ({self.key_map})")
        if self.ema:
            parts.append("EMA")
        return ", ".join(parts)

    def record(self) -> dict[str, Any]:
        """JSON-ready description, for the analysis results."""
        return {"where": "/".join(self.where), "stripped": "".join(self.stripped),
                "weights": "ema" if self.ema else "raw", "key_map": self.key_map}


def _is_ema_name(name: str) -> bool:
    return bool(_EMA_TOKEN.search(name.rstrip(".")))


def tensor_dicts(obj: Mapping[Any, Any]) -> list[tuple[tuple[str, ...], dict[str, Tensor]]]:
    """``(nesting path, str -> Tensor entries)`` of ``obj`` and the mappings below it."""
    found: list[tuple[tuple[str, ...], dict[str, Tensor]]] = []

    def visit(node: Mapping[Any, Any], where: tuple[str, ...]) -> None:
        tensors = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            found.append((where, tensors))
        if len(where) >= _MAX_NESTING:
            return
        keys = [k for k in node if isinstance(k, str) and isinstance(node[k], Mapping)]
        known = [k for k in NESTING_KEYS if k in keys]
        for key in known + [k for k in keys if k not in known]:
            if not where and key in SKIPPED_KEYS:
                continue
            visit(node[key], (*where, key))

    visit(obj, ())
    return found


def _prefix_variants(state: dict[str, Tensor], depth: int = 0
                     ) -> list[tuple[tuple[str, ...], dict[str, Tensor]]]:
    """The state as it is, then with shared or per-component first name parts removed."""
    out: list[tuple[tuple[str, ...], dict[str, Tensor]]] = [((), state)]
    if depth >= _MAX_STRIPS or not state:
        return out
    heads: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        head, dot, rest = key.partition(".")
        if dot and rest:
            heads.setdefault(head + ".", {})[rest] = value
    for prefix, sub in heads.items():
        if len(heads) > 1 and len(sub) < 2:
            continue  # a lone buffer of another attribute (e.g. a loss's class weights)
        for stripped, variant in _prefix_variants(sub, depth + 1):
            out.append(((prefix, *stripped), variant))
    return out


def candidates(obj: Any, *, strip_prefix: str | None = None,
               key_maps: Sequence[Any] = ()) -> list[Candidate]:
    """Every candidate reading of the weights in ``obj``, in search order (module docstring).

    Parameters
    ----------
    obj : mapping
        What the checkpoint file holds (``torch.load`` result or safetensors tensors).
    strip_prefix : str, optional
        Keep only keys starting with this prefix, with the prefix removed.
    key_maps : sequence of KeyMap
        The architecture's rename maps, tried after each candidate as it is.
    """
    if not isinstance(obj, Mapping):
        return []
    out: list[Candidate] = []
    seen: set[tuple[str, ...]] = set()
    for where, tensors in tensor_dicts(obj):
        ema_here = any(_is_ema_name(w) for w in where)
        bookkeeping = [k for k in tensors if k.rsplit(".", 1)[-1] in BOOKKEEPING_KEYS]
        state = {k: v for k, v in tensors.items() if k not in bookkeeping}
        if bookkeeping:
            ema_here = True
        if strip_prefix:
            state = {k[len(strip_prefix):]: v for k, v in state.items()
                     if k.startswith(strip_prefix) and len(k) > len(strip_prefix)}
        for stripped, variant in _prefix_variants(state):
            ema = ema_here or any(_is_ema_name(p) for p in stripped)
            maps = [None, *key_maps]
            for key_map in maps:
                named = key_map.apply(variant) if key_map is not None else variant
                if key_map is not None and set(named) == set(variant):
                    continue
                signature = (*where, "|", *stripped, "|", key_map.name if key_map else "")
                if signature in seen:
                    continue
                seen.add(signature)
                out.append(Candidate(where, ((strip_prefix,) if strip_prefix else ()) + stripped,
                                     ema, key_map.name if key_map else None, named))
    return out


def _mismatch(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]
              ) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, shapes


def _chosen(candidate: Candidate, weights: str) -> bool:
    if weights in ("auto", "raw"):
        return not candidate.ema if weights == "raw" else True
    if weights == "ema":
        return candidate.ema
    names = {w for w in candidate.where} | {p.rstrip(".") for p in candidate.stripped}
    return weights.rstrip(".") in names


def key_list(keys: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` keys, comma-separated, and how many more (for one-line errors)."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def mismatch_message(missing: Sequence[str], unexpected: Sequence[str],
                     shapes: Sequence[str]) -> str:
    """How weights differ from a model, in one line: shape mismatches, missing and unexpected
    keys (the first few of each)."""
    parts = []
    if shapes:
        parts.append(f"shape mismatch: {key_list(shapes, 2)}")
    if missing:
        parts.append(f"missing keys: {key_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {key_list(unexpected)}")
    return "; ".join(parts)


def resolve(obj: Any, model: nn.Module, path: Any, *, weights: str = "auto",
            strip_prefix: str | None = None, key_maps: Sequence[Any] = (),
            arch: str | None = None) -> Candidate:
    """The candidate (see the module docstring) whose weights fit ``model`` exactly.

    Parameters
    ----------
    obj : mapping
        What the checkpoint file holds.
    model : nn.Module
        The freshly built model the weights must fit.
    path : path-like
        The file, for messages.
    weights : {"auto", "raw", "ema"} or str
        Which weights to take (``str``: a nesting key or a prefix name).
    strip_prefix : str, optional
        As :func:`candidates`.
    key_maps : sequence of KeyMap
        The architecture's rename maps.
    arch : str, optional
        The architecture's name, for messages.

    Returns
    -------
    Candidate

    Raises
    ------
    CheckpointError
        When no candidate fits: names the keys found, the closest candidate and what it lacks,
        and the flag that fixes it (``--arch``/``--num-classes``, ``--weights``,
        ``--strip-prefix``).
    """
    expected = model.state_dict()
    found = candidates(obj, strip_prefix=strip_prefix, key_maps=key_maps)
    fitting = [c for c in found if not any(_mismatch(c.state, expected))]
    chosen = [c for c in fitting if _chosen(c, weights)]
    if weights == "auto" and any(not c.ema for c in chosen):
        chosen = [c for c in chosen if not c.ema]
    if chosen:
        return chosen[0]
    built = f"the {type(model).__name__}" + (f" built as {arch!r}" if arch else " that was built")
    if fitting:
        have = "; ".join(sorted({c.describe() for c in fitting}))
        flag = "--weights ema" if weights == "raw" else "--weights raw" if weights == "ema" \
            else "--weights auto (or one of the keys found)"
        only = " only EMA weights" if weights == "raw" and all(c.ema for c in fitting) else ""
        raise CheckpointError(f"{path}: no weights match --weights {weights}; the file holds"
                              f"{only} {have}; pass {flag}")
    raise CheckpointError(f"{path}: no weights in it fit {built}; "
                          f"{_diagnose(obj, found, expected, strip_prefix)}")


def _diagnose(obj: Any, found: list[Candidate], expected: Mapping[str, Tensor],
              strip_prefix: str | None) -> str:
    """What was found, the closest candidate's differences and the flag that fixes it."""
    top = ", ".join(repr(k) for k in list(obj)[:8]) if isinstance(obj, Mapping) else "none"
    if not found:
        return (f"it holds no weight tensors (top-level keys: {top})"
                + (f" with prefix {strip_prefix!r}" if strip_prefix else "")
                + "; save model.state_dict() or pass --strip-prefix / --weights naming them")

    def distance(c: Candidate) -> tuple[int, int, int, int]:
        # Most names in common first; among equals, the least unwrapped reading.
        missing, unexpected, shapes = _mismatch(c.state, expected)
        common = sum(1 for k in c.state if k in expected)
        return (-common, len(c.stripped), len(missing) + len(unexpected), len(shapes))

    best = min(found, key=distance)
    missing, unexpected, shapes = _mismatch(best.state, expected)
    hint = _fix_hint(found, missing, unexpected, shapes)
    return (f"top-level keys {top}; {len(found)} candidate readings tried, closest: "
            f"{best.describe()} ({mismatch_message(missing, unexpected, shapes)}); {hint}")


def _fix_hint(found: list[Candidate], missing: list[str], unexpected: list[str],
              shapes: list[str]) -> str:
    from dtprobe.models import guess_arch

    # A registered architecture that fits some candidate exactly is the most useful fix.
    guesses = next((g for c in found[:16] if not c.ema and (g := guess_arch(c.state))), [])
    if guesses:
        g = guesses[0]
        params = " ".join(f"--arch-param {k}={str(v).lower() if isinstance(v, bool) else v}"
                          for k, v in g.kwargs.items())
        return (f"pass the right --arch: these keys fit --arch {g.arch} --num-classes "
                f"{g.num_classes}"
                + (f" {params}" if params else ""))
    if shapes and not missing and not unexpected:
        return ("pass the right --arch / --num-classes / --arch-param (the names fit, the "
                "sizes do not)")
    heads = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
    if missing and unexpected and len(heads) == 1:
        prefix = heads.pop()
        return (f"the keys carry an extra prefix {prefix!r}: pass --strip-prefix {prefix}"
                " (or the right --arch)")
    return "pass the right --arch / --num-classes, or --strip-prefix / --weights naming the weights"

