"""The migration pages' Python blocks run as written (each in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["migration-hippotrainer.md", "migration-hypergrad.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks():
    for page in PAGES:
        path = DOCS / page
        if not path.exists():
            continue
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{page}:{i}")


@pytest.mark.parametrize("code", list(blocks()))
def test_block_runs(code, capsys):
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    assert "Traceback" not in capsys.readouterr().out


def test_both_pages_exist_and_have_blocks():
    assert all((DOCS / p).exists() for p in PAGES)
    assert len(list(blocks())) >= 6
