"""Smoke tests of the implicit benchmarks (``--quick``, into a temporary folder): reuse
across hyper-steps and the hyper-step cost table. Their numbers are checked against what
the benchmark itself can verify: every strategy reached the target error on the dense system,
the real-product call is close to it, products add up, and every method has a cost row."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _module(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_reuse_quick(tmp_path: Path, capsys) -> None:
    assert _module("reuse").main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "reuse.json").read_text())
    assert "Totals over the hyper-steps" in (tmp_path / "reuse.md").read_text()
    rows, target = data["rows"], data["settings"]["target"]
    assert len(rows) == data["settings"]["steps"] == 3
    for row in rows:
        for name in ("cold CG", "warm CG", "warm NystromPCG(auto refresh)"):
            r = row[name]
            assert r["failed"] is None
            assert r["dense_error"] <= target and r["hvps"] >= r["budget"] >= 1
            # the real call (autograd products) lands where the dense bisection said
            assert r["error"] <= 1.5 * target
    # the first hyper-step has nothing to reuse: warm CG does what cold CG does; the
    # Nystrom strategy pays its sketch (rank 4) once; later warm starts cost one product
    # (their residual) unless CG drops them
    assert rows[0]["warm CG"]["hvps"] == rows[0]["cold CG"]["hvps"]
    pcg = [r["warm NystromPCG(auto refresh)"] for r in rows]
    assert pcg[0]["hvps"] == pcg[0]["budget"] + 4
    assert all(r["warm CG"]["hvps"] - r["warm CG"]["budget"] in (0, 1) for r in rows[1:])
    assert all(r["cold CG"]["hvps"] == r["cold CG"]["budget"] for r in rows)
    totals = {s["strategy"]: s for s in data["summary"]}
    assert totals["cold CG"]["hvps"] == sum(r["cold CG"]["hvps"] for r in rows)
    # one perturbed replay of RecycledCG on the dense systems: its first system has no
    # recycled space yet, so a 1e-12 change of b leaves its budget as the run's
    (replay,) = data["replays"]
    assert replay["replay"] == 1 and replay["hvps"] == sum(replay["per_step"])
    assert len(replay["per_step"]) == 3 and min(replay["per_step"]) >= 1
    assert replay["per_step"][0] == rows[0]["warm RecycledCG"]["hvps"]
    assert "## RecycledCG over perturbed replays" in (tmp_path / "reuse.md").read_text()


def test_hyperstep_cost_quick(tmp_path: Path, capsys) -> None:
    mod = _module("hyperstep_cost")
    returned = mod.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "hyperstep_cost.json").read_text())
    assert returned == data
    rows = [r for r in data["rows"] if "method" in r]
    assert {(r["problem"], r["method"]) for r in rows} == {
        (p, m) for p in ("logreg", "mlp", "mnist-mlp", "transformer") for m in mod.METHODS
    }
    for r in rows:
        assert r["error"] is None and r["hyper_steps"] == 2 and r["cost"] > 0
    by = {(r["problem"], r["method"]): r for r in rows}
    assert by[("logreg", "IFT(CG(maxiter=10, tol=0))")]["products"] == 10
    assert by[("logreg", "ForwardMode()")]["goal"] == (2 + 30) * 10
    assert by[("logreg", "T1T2()")]["goal"] == 2
    assert by[("mnist-mlp", "ForwardMode()")]["goal"] == (2 + 1) * 10
    assert by[("transformer", "ForwardMode()")]["goal"] == (2 + 1) * 10
    assert (
        data["settings"]["transformer_steps"] == 20
        and "20 for the transformer" in capsys.readouterr().out
    )
    # every product counts: IFT's fixed-budget Neumann series spends one more on its residual
    assert by[("logreg", "IFT() (Neumann, 10 terms)")]["products"] == 11
    for r in rows:  # a wall-clock ratio: above 1 in a quiet process, not on a loaded machine
        assert 0.0 < r["e2e"] < float("inf")
    # the end-to-end ratio: plain steps at their median, hyper-steps at their mean after the first
    run = mod.H.Run("r", lambda: None, 10, step_s=[1.0] * 26 + [50.0], hyper_s=[40.0, 5.0, 7.0])
    assert mod.e2e(run, 0.5, 30) == ((30 - 3) * 1.0 + 3 * 6.0) / (30 * 0.5)


def test_hyperstep_cost_committed_results_render() -> None:
    """The committed Markdown is what the renderer makes of the committed JSON."""
    results = BENCHMARKS / "results"
    data = json.loads((results / "hyperstep_cost.json").read_text())
    text = "\n\n".join(_module("hyperstep_cost").render(data))
    assert "|---" in text and text in (results / "hyperstep_cost.md").read_text()
