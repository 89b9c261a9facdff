"""The bibliography of module docstrings (:mod:`dtprobe.references`): each paper written once.

Every module that builds its References section from :data:`PAPERS` shows the full citations in
its ``__doc__``, numbered in the order given; every paper is cited somewhere; a typo in a key
fails at import, also when docstrings are stripped (``__doc__`` is ``None``).
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from dtprobe.references import PAPERS, references_section, with_references

PACKAGE = Path(__file__).resolve().parent.parent / "dtprobe"


def _citing_modules() -> dict[str, list]:
    """Module name -> the entries its ``__doc__ = with_references(__doc__, ...)`` names, read
    from the source (independently of the function under test)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "with_references"):
                name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                found[name] = [ast.literal_eval(a) for a in node.value.args[1:]]
    return found


CITING = _citing_modules()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_modules_that_cite_were_found():
    assert len(CITING) >= 20
    assert {"dtprobe.training.objectives.ctc", "dtprobe.plotting.charts",
            "dtprobe.results.core", "dtprobe.checkpoints.reader"} <= set(CITING)


@pytest.mark.parametrize("name", sorted(CITING))
def test_module_docstring_holds_each_citation_in_order(name):
    doc = importlib.import_module(name).__doc__
    assert doc.count("\nReferences\n----------\n") == 1
    body = doc.split("\nReferences\n----------\n")[1]
    entries = CITING[name]
    numbers = re.findall(r"^\.\. \[(\d+)\] ", body, flags=re.M)
    assert numbers == [str(i) for i in range(1, len(entries) + 1)]
    flat = _flat(body)
    for number, entry in enumerate(entries, start=1):
        key, note = (entry, "") if isinstance(entry, str) else entry
        start = flat.index(f".. [{number}] ")
        assert flat[start:].startswith(f".. [{number}] {_flat(PAPERS[key])}")
        assert _flat(note) in flat[start:]
    for line in body.splitlines():
        assert len(line) <= 96 and (line.startswith((".. [", "   ")) or not line)


def test_every_paper_is_cited_and_the_trade_off_papers_say_the_same_everywhere():
    cited = {e if isinstance(e, str) else e[0] for entries in CITING.values() for e in entries}
    assert cited == set(PAPERS)
    # the authors of Cui et al. 2022 as the ECCV paper lists them (three modules had others)
    for name, entries in CITING.items():
        if "cui2022" in [e if isinstance(e, str) else e[0] for e in entries]:
            doc = _flat(importlib.import_module(name).__doc__)
            assert "B. Zhao, R. Song, J. Liang, B. Zhou, O. Yoshie" in doc, name
            assert "Zhang" not in doc, name


def test_section_layout_and_notes():
    text = references_section("tian2020", ("wu2018", "(stage 1)"), ("xie2017", "; code: x"))
    lines = text.splitlines()
    assert lines[:2] == ["References", "----------"]
    assert lines[2].startswith(".. [1] Y. Tian") and text.endswith("; code: x.\n")
    assert "Distillation\", ICLR 2020." in _flat(text)
    assert "CVPR 2018 (stage 1)." in _flat(text)
    assert "CVPR 2017; code: x." in _flat(text)


def test_unknown_key_fails_even_without_a_docstring():
    with pytest.raises(KeyError, match="no paper 'kornblith2012'"):
        with_references("Doc.", "kornblith2012")
    with pytest.raises(KeyError, match="add it there"):
        with_references(None, "nope")
    assert with_references(None, "cui2022") is None
    assert with_references("Doc.\n\n", "cui2022").startswith("Doc.\n\nReferences\n")



def test_the_cli_lists_everything_with_docstrings_stripped():
    """`python -OO` strips every docstring: registries that read a first docstring line and
    the references appended to module docstrings must still import and list."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-OO", "-m", "dtprobe", "list"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ctc" in done.stdout and "probe_accuracy" in done.stdout
