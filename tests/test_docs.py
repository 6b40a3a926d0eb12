"""The documentation runs as written and builds strictly.

- Every ```python block in README.md and docs/**/*.md executes, as written, in a fresh
  namespace (in this process, with a timeout, on one CPU thread; torch's global state is
  restored after each block). Two markers, an HTML comment on the line right before the fence:

  ``<!-- skip-test: <reason> -->``  the block is skipped, with that reason (it must say one);
  ``<!-- docs-test: continue -->``  the block continues the previous block of the same page,
                                    in its namespace (a tutorial's next step).

  A block fails if it raises, exceeds its time, emits a ``HypergradientWarning`` or calls
  something deprecated (``DeprecationWarning``/``FutureWarning`` raised at the block's own
  lines): the documentation shows the current API.
- The API reference documents every name of ``hypergradient.__all__`` and the subpackages,
  and every ``::: identifier`` in it imports.
- Relative links in README.md and the docs point to files that exist.
- ``mkdocs build --strict`` succeeds (when mkdocs and the ``docs`` extra are installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import hypergradient as hg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

BLOCK_TIMEOUT = 60  # seconds per block (each takes a few seconds on a 2-core CPU)
SKIP = re.compile(r"^<!--\s*skip-test:\s*(.*?)\s*-->$")
CONTINUE = re.compile(r"^<!--\s*docs-test:\s*continue\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # reason, or None
    continues: bool  # runs in the previous block's namespace
    previous: Block | None  # the block before it on the same page

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, with their markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang.lower() not in ("python", "py"):
            continue
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(before)
        if skip is not None and not skip.group(1):
            raise ValueError(f"{page}:{start + 1}: skip-test needs a reason")
        blocks.append(
            Block(
                page=page,
                line=start + 1,
                code="\n".join(body) + "\n",
                skip=skip.group(1) if skip else None,
                continues=bool(CONTINUE.match(before)),
                previous=blocks[-1] if blocks else None,
            )
        )
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]
_NAMESPACES: dict[str, dict[str, Any]] = {}  # namespace after each block that ran


class BlockTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise BlockTimeout(f"the block ran longer than {BLOCK_TIMEOUT} s")


def _run(block: Block, namespace: dict[str, Any]) -> None:
    """Execute one block in ``namespace``: timeout, warning checks, torch state restored."""
    filename = f"<{block.name}>"
    code = compile(block.code, filename, "exec")
    saved = (
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
        torch.get_num_threads(),
        torch.random.get_rng_state(),
    )
    torch.set_num_threads(1)  # small models; on a shared machine more threads only wait
    alarm = hasattr(signal, "SIGALRM")
    if alarm:
        previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(BLOCK_TIMEOUT)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(code, namespace)
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_handler)
        torch.set_default_dtype(saved[0])
        torch.set_grad_enabled(saved[1])
        torch.set_num_threads(saved[2])
        torch.random.set_rng_state(saved[3])
    bad = [
        w
        for w in caught
        if issubclass(w.category, hg.HypergradientWarning)
        or (issubclass(w.category, (DeprecationWarning, FutureWarning)) and w.filename == filename)
    ]
    assert not bad, f"{block.name} warns: " + "; ".join(
        f"{w.category.__name__}: {w.message}" for w in bad
    )


def _namespace_for(block: Block) -> dict[str, Any]:
    """A fresh namespace, or for a continuation the previous block's (re-run if needed)."""
    if not block.continues:
        return {"__name__": "__docs__"}
    previous = block.previous
    assert previous is not None, f"{block.name}: 'continue' on the first block of its page"
    if previous.name not in _NAMESPACES:
        namespace = _namespace_for(previous)
        _run(previous, namespace)
        _NAMESPACES[previous.name] = namespace
    return _NAMESPACES[previous.name]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_code_block_runs(block: Block) -> None:
    if block.skip:
        pytest.skip(block.skip)
    namespace = _namespace_for(block)
    _run(block, namespace)
    _NAMESPACES[block.name] = namespace


def test_readme_has_runnable_blocks() -> None:
    readme = [b for b in BLOCKS if b.page.name == "README.md"]
    assert len(readme) >= 6 and not any(b.skip for b in readme)


def test_block_parser_reads_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- docs-test: continue -->\n```python\n"
        "b = a + 1\n```\n\n<!-- skip-test: needs torchrun -->\n```py\nraise SystemExit\n```\n"
        "```bash\nls\n```\n\n    ```python\n    c = 3\n    ```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [b.code for b in blocks] == ["a = 1\n", "b = a + 1\n", "raise SystemExit\n", "c = 3\n"]
    assert [b.continues for b in blocks] == [False, True, False, False]
    assert [b.skip for b in blocks] == [None, None, "needs torchrun", None]
    page.write_text("<!-- skip-test: -->\n```python\npass\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks(page)


# --------------------------------------------------------------------------- API reference

API_PAGES = sorted((DOCS / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)
#: Subpackages documented as whole modules besides ``hypergradient.__all__``.
MODULES = [
    "hypergradient.optim",
    "hypergradient.meta",
    "hypergradient.distributed",
    "hypergradient.compat",
    "hypergradient.compat.hypergrad",
    "hypergradient.compat.hypergrad.approx_hypergrad",
    "hypergradient.compat.hippotrainer",
]


def _documented() -> set[str]:
    return {m for page in API_PAGES for m in DIRECTIVE.findall(page.read_text(encoding="utf-8"))}


def _resolve(identifier: str) -> Any:
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(identifier)


def test_api_reference_covers_the_public_api() -> None:
    """Each public name is rendered by some directive (by identity: a name that is also a
    submodule, like ``implicit``, is documented by its full path ``hypergradient.implicit.
    implicit``, since ``::: hypergradient.implicit`` would render the module)."""
    documented = _documented()
    rendered = {id(_resolve(identifier)) for identifier in documented}
    missing = [name for name in hg.__all__ if id(getattr(hg, name)) not in rendered]
    assert not missing, (
        f"names of hypergradient.__all__ missing from docs/api/*.md: {missing}; add a line "
        "`::: hypergradient.NAME` to the page of its topic"
    )
    assert not [m for m in MODULES if m not in documented], "a subpackage page is missing"


def test_api_reference_identifiers_import() -> None:
    for identifier in sorted(_documented()):
        _resolve(identifier)  # raises ImportError / AttributeError for a stale name


# --------------------------------------------------------------------------- links

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_exist() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:|^#", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


# --------------------------------------------------------------------------- site build


def _missing_docs_tools() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


@pytest.mark.skipif(
    _missing_docs_tools() is not None,
    reason=f"{_missing_docs_tools()} is not installed (pip install -e '.[docs]')",
)
def test_site_builds_strict(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for page in ("index.html", "getting-started/index.html", "api/functional/index.html"):
        assert (tmp_path / page).is_file(), page
