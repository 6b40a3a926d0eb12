"""Smoke test of ``benchmarks/product_modes.py`` (first-order products against double
backward on the model zoo): ``--quick`` writes its JSON, Markdown and plot, and the quick
run's own figures hold what docs/guide/modes.md states about float64."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _module():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import product_modes

    return product_modes


def check_accuracy(result):
    rows = {(a["dtype"], a["mode"]): a for a in result["accuracy"]}
    # float64: the first-order mode is accurate to ~1e-10 (bound 1e-7), the double
    # backward is the reference itself
    assert rows["float64", "first_order"]["hvp_error"] < 1e-7
    assert rows["float64", "first_order"]["unrolled_error"] < 1e-7
    assert rows["float64", "double_math"]["hvp_error"] < 1e-12
    assert rows["float32", "double_math"]["hvp_error"] < 1e-5
    # float32 first order: accurate, or refused where a ReLU switches inside the step (the
    # full run's ReLU transformer: 6.7x off before the kink check); never in between
    f32 = rows["float32", "first_order"]["hvp_error"]
    assert f32 == "refused (kink)" or f32 < 1e-2
    if result["model"].startswith(("mlp", "transformer_gelu")):  # smooth: never refused
        assert f32 != "refused (kink)"
    assert all(c["product_ms"] == "refused (kink)" or c["product_ms"] > 0 for c in result["cost"])


def test_product_modes_quick_run(tmp_path):
    product_modes = _module()
    returned = product_modes.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "product_modes.json").read_text())
    assert returned == data
    md = (tmp_path / "product_modes.md").read_text()
    assert md.startswith("# ") and "|---" in md
    assert (tmp_path / "product_modes.png").stat().st_size > 1000
    assert len(data["results"]) == 2  # quick: the MLP and the transformer
    for result in data["results"]:
        check_accuracy(result)


def test_committed_product_modes_results_render_and_hold():
    product_modes = _module()
    data = json.loads((BENCHMARKS / "results" / "product_modes.json").read_text())
    assert data["args"]["quick"] is False
    assert "|---" in "\n".join(product_modes.render(data))
    for result in data["results"]:
        check_accuracy(result)
