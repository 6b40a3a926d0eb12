"""The package's structure, checked: the invariants of ``docs/architecture.md`` hold by test.

- **Layers**: a module imports only from its own layer or the layers below it (the table
  ``LAYERS`` is the one in the architecture page).
- **No private names across modules**: no ``from .x import _name`` between modules
  (underscore *modules*, ``_tree`` and ``_vocab``, are the package's internal vocabulary; their
  members are public names).
- **Size**: no module above 400 lines, no class above 250 lines, no function above cyclomatic
  complexity 15 (radon's count).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "hypergradient"

# Layer of each top-level module or subpackage of ``hypergradient`` (the architecture page).
LAYERS = {
    "_vocab": 0,
    "_autograd": 0,
    "_norms": 0,
    "_version": 0,
    "_tree": 1,
    "optim": 1,
    "constraints": 1,
    "operators": 2,
    "solvers": 3,
    "distributed": 3,
    "methods": 4,
    "hyperoptimizer": 5,
    "meta": 5,
    "compat": 6,
    "integrations": 6,
    "": 6,  # the package root re-exports everything
}

MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250
MAX_COMPLEXITY = 15


def _modules() -> list[pathlib.Path]:
    return sorted(PKG.rglob("*.py"))


def _dotted(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _top(parts: list[str]) -> str:
    """The top-level unit (module or subpackage) of a dotted ``hypergradient`` name."""
    return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path) -> list[tuple[list[str], list[str]]]:
    """``(target module parts, imported names)`` for every in-package import of a module."""
    here = _dotted(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] == "hypergradient":
                found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hypergradient":
                    found.append((alias.name.split("."), []))
    return found


def test_every_unit_of_the_package_has_a_layer():
    units = {
        p.stem if p.is_file() else p.name for p in PKG.iterdir() if not p.name.startswith("__")
    }
    units = {u for u in units if u not in {"py", "typed"} and not u.endswith(".typed")}
    missing = sorted(u for u in units if u not in LAYERS and u != "py")
    assert not missing, f"add these to LAYERS and to docs/architecture.md: {missing}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_from_its_layer_or_below(path):
    here = _dotted(path)
    layer = LAYERS[_top(here)]
    for target, names in _imports(path):
        units = [_top(target)]
        if len(target) == 1:  # ``from hypergradient import x`` / ``from .. import x``
            units = [n if n in LAYERS else "" for n in names] or [""]
        for unit in units:
            if unit == _top(here):
                continue
            assert LAYERS[unit] <= layer, (
                f"{'.'.join(here)} (layer {layer}) imports {'.'.join(target)} {names} "
                f"from layer {LAYERS[unit]}"
            )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_is_imported_across_modules(path):
    here = _dotted(path)
    for target, names in _imports(path):
        if target == here:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        # importing a private *module* (``from . import _checks``) of one's own package is fine
        private = [n for n in private if not (PKG.joinpath(*target[1:], n + ".py")).exists()]
        assert not private, f"{'.'.join(here)} imports private {private} from {'.'.join(target)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_class_sizes(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split the module"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{path.name}: class {node.name} has {size} lines"


def test_no_function_above_the_complexity_bound():
    radon = pytest.importorskip("radon.complexity")
    over = []
    for path in _modules():
        for block in radon.cc_visit(path.read_text(encoding="utf-8")):
            for item in [block, *getattr(block, "methods", [])]:
                if item.complexity > MAX_COMPLEXITY:
                    over.append(
                        f"{path.relative_to(SRC)}:{item.lineno} {item.name} {item.complexity}"
                    )
    assert not over, over
