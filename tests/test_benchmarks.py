"""Smoke test of every benchmark: ``--quick`` runs it in this process on tiny sizes, into a
temporary folder; its JSON, Markdown and plots must be written and well formed. The tables of
every committed result are rendered again from its JSON (what ``--replot`` does), and
docs/results.md is generated from the committed JSON.

Compared libraries (hypergrad, HippoTrainer, Optuna, TorchOpt) that are not installed are
skipped inside the benchmarks, so this runs without them.
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
RESULTS = BENCHMARKS / "results"
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
PLOTS = {
    "hvp_cost": ["hvp_cost"],
    "quadratic_bilevel": ["quadratic_bilevel_implicit", "quadratic_bilevel_trajectory"],
    "scale": ["scale_params", "scale_hparams", "scale_steps"],
    "distributed": [],
    "vs_torchopt": [],
}

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")


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


def _numbers(obj) -> int:
    """How many numbers ``obj`` holds (NaN/inf must have been written as null)."""
    if isinstance(obj, dict):
        return sum(_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_numbers(v) for v in obj)
    if isinstance(obj, float):
        assert math.isfinite(obj)
    return isinstance(obj, (int, float)) and not isinstance(obj, bool)


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_json_tables_and_plots(name: str, tmp_path: Path, capsys) -> None:
    if name == "vs_optuna":  # without Optuna it writes a note and no table
        pytest.importorskip("optuna")
    assert isinstance(_module(name).main(["--quick", "--out", str(tmp_path)]), dict)
    data = json.loads((tmp_path / f"{name}.json").read_text())
    md = (tmp_path / f"{name}.md").read_text()
    assert md.startswith("# ") and "|---" in md and "Traceback" not in md, md[:500]
    assert data["args"]["quick"] is True and data["machine"]["torch"] == torch.__version__
    assert _numbers(data) > 10
    for plot in PLOTS.get(name, [name]):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000, plot
    assert "Traceback" not in capsys.readouterr().out
    # --replot rewrites the same tables from the JSON alone
    (tmp_path / f"{name}.md").unlink()
    assert isinstance(_module(name).main(["--replot", "--out", str(tmp_path)]), dict)
    assert (tmp_path / f"{name}.md").read_text().split("Total wall time")[0] == md.split("Total")[0]


@pytest.mark.parametrize("name", [n for n in NAMES if (RESULTS / f"{n}.json").exists()])
def test_committed_results_render(name: str) -> None:
    module, data = _module(name), json.loads((RESULTS / f"{name}.json").read_text())
    text = "\n\n".join(module.render(data))
    assert "|---" in text and "None" not in text.replace("NoneType", "")


def test_results_doc_generated_from_committed_json() -> None:
    text = _module("make_results_md").render(RESULTS)
    assert text.startswith("# Benchmark results")
    assert "{" not in text.replace("{md,json,png}", ""), "a placeholder was left unfilled"
    for name in NAMES:
        if (RESULTS / f"{name}.json").exists():
            assert f"benchmarks/{name}.py" in text
