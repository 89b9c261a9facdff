"""Built-in dataset, architecture and metric names, known without importing torch.

The command line checks ``--dataset``, ``--arch`` and ``--metrics`` before it imports torch
(which takes 5-50 s on a busy machine), so a typo is reported at once, with a "did you mean"
suggestion. The names come from a static read (:mod:`ast`) of the registering calls in the
package's source: ``@register_dataset("name")``, ``@register_arch("name", ...)`` and
``register_metric("name", ...)`` / ``_register("name", ...)``. A test checks that this read
equals the live registries, so the two cannot drift.
"""

from __future__ import annotations

import ast
import difflib
import functools
from pathlib import Path

from dtprobe.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent

# kind -> (sub-package scanned, names of the registering functions)
_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dataset": ("data", ("register_dataset",)),
    "architecture": ("models", ("register_arch", "register_alias")),
    "metric": ("metrics", ("register_metric", "_register")),
}
METRIC_KEYWORDS = ("default", "all")
"""Words ``--metrics`` accepts besides metric names."""


def _called_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _loop_values(tree: ast.AST) -> dict[str, list[str]]:
    """``for q in ("xt", "ty"):`` -> ``{"q": ["xt", "ty"]}``; also ``for q, w in ((..), ..)``.

    Only loops over literal tuples/lists of string constants are read.
    """
    values: dict[str, list[str]] = {}

    def strings(elts: list[ast.expr]) -> list[str] | None:
        ok = all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts)
        return [e.value for e in elts] if ok else None  # type: ignore[attr-defined]

    for node in ast.walk(tree):
        if not (isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List))):
            continue
        if isinstance(node.target, ast.Name):
            found = strings(node.iter.elts)
            if found is not None:
                values[node.target.id] = found
        elif isinstance(node.target, ast.Tuple):
            rows = [e.elts for e in node.iter.elts if isinstance(e, ast.Tuple)]
            if len(rows) != len(node.iter.elts):
                continue
            for pos, name in enumerate(node.target.elts):
                column = [row[pos] for row in rows if len(row) > pos]
                found = strings(column) if len(column) == len(rows) else None
                if isinstance(name, ast.Name) and found is not None:
                    values[name.id] = found
    return values


def _literal_names(arg: ast.expr, loops: dict[str, list[str]]) -> list[str]:
    """The string(s) a first argument can take: a constant, or an f-string over loop values."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if not isinstance(arg, ast.JoinedStr):
        return []
    out = [""]
    for part in arg.values:
        if isinstance(part, ast.Constant):
            out = [o + str(part.value) for o in out]
        elif (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name)
              and part.value.id in loops and part.format_spec is None):
            out = [o + v for o in out for v in loops[part.value.id]]
        else:
            return []
    return out


@functools.cache
def builtin_names(kind: str) -> tuple[str, ...]:
    """Sorted names that dtprobe's own modules register for ``kind``.

    Parameters
    ----------
    kind : ``"dataset"``, ``"architecture"`` or ``"metric"``.
    """
    folder, funcs = _SOURCES[kind]
    names: set[str] = set()
    for path in sorted((_PACKAGE / folder).rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # a broken module fails loudly on import; here it only adds no names
        loops = _loop_values(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node) in funcs and node.args:
                names.update(_literal_names(node.args[0], loops))
    return tuple(sorted(names))


def suggest(name: str, choices: tuple[str, ...] | list[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (``""`` if none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(c) for c in close) + "? "


def check_name(name: str | None, kind: str, option: str) -> None:
    """Raise :class:`ConfigError` naming ``option`` if ``name`` is not a built-in ``kind``.

    ``None`` passes (the option was not given). Architecture families with a colon
    (``timm:<model>``, ``torchvision:<model>``, ``hf:<folder>``, ``package.module:callable``)
    pass here; the registry checks them when they are built.
    """
    if name is None or (kind == "architecture" and ":" in name):
        return
    known = builtin_names(kind)
    if not known or name in known:  # no names read (unusual install): leave it to the registry
        return
    extra = (" (or timm:<model_name>, torchvision:<model_name>, hf:<folder>, "
             "package.module:callable)") if kind == "architecture" else ""
    raise ConfigError(f"{option}: unknown {kind} {name!r}; {suggest(name, known)}"
                      f"available: {', '.join(known)}{extra}")


def check_metric_names(names: list[str] | None, option: str = "--metrics") -> None:
    """Raise :class:`ConfigError` for unknown names in ``names`` (``None`` passes)."""
    known = builtin_names("metric")
    if not names or not known:
        return
    choices = known + METRIC_KEYWORDS
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ConfigError(f"{option}: unknown metric(s) {', '.join(map(repr, unknown))}; "
                          f"{suggest(unknown[0], choices)}available: {', '.join(known)}, "
                          "or 'default' / 'all'")
