"""Smoke test of every benchmark: ``--quick`` runs it in-process on tiny sizes, into a
temporary folder, and its Markdown table and JSON results must be written and well formed.

Compared libraries (hypergrad, HippoTrainer, Optuna, TorchOpt) that are not installed are
skipped inside the benchmarks, so this runs without them; the results docs generator is
checked against the committed JSON.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NAMES = [
    "implicit_solvers",
    "hvp_cost",
    "quadratic_bilevel",
    "hyperoptimizer_methods",
    "vs_hippotrainer",
    "mixed_precision",
    "scale",
    "distributed",
    "vs_optuna",
    "vs_torchopt",
]

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """The benchmarks set the thread count and seed torch; give the suite its own back."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _module(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def _finite_numbers(obj) -> int:
    """How many numbers ``obj`` holds (NaN/inf were written as null, so all are finite)."""
    if isinstance(obj, dict):
        return sum(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_finite_numbers(v) for v in obj)
    if isinstance(obj, float):
        assert math.isfinite(obj)
    return isinstance(obj, (int, float)) and not isinstance(obj, bool)


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_table_and_json(name: str, tmp_path: Path, capsys) -> None:
    if name == "vs_optuna":
        pytest.importorskip("optuna")
    if name in ("scale", "hvp_cost", "distributed"):
        pytest.importorskip("mlxtend")
    assert _module(name).main(["--quick", "--out", str(tmp_path)]) in (0, None)
    md = (tmp_path / f"{name}.md").read_text()
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert md.startswith("# ") and "|---" in md, md[:500]
    assert data["args"]["quick"] is True and data["machine"]["torch"] == torch.__version__
    assert _finite_numbers(data) > 10
    assert "Traceback" not in capsys.readouterr().out


def test_results_doc_generated_from_committed_json(tmp_path: Path) -> None:
    gen = _module("make_results_md")
    text = gen.render(BENCHMARKS / "results")
    assert text.startswith("# Benchmark results")
    assert "{" not in text.replace("{md,json,png}", ""), "a placeholder was left unfilled"
    for name in NAMES:
        if (BENCHMARKS / "results" / f"{name}.json").exists():
            assert f"benchmarks/{name}.py" in text or name == "vs_torchopt"
