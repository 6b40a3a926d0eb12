"""What the documentation says a code block prints is what it prints.

tests/test_docs.py runs every block but does not read its output. Two claims were false:
which-method.md said the Nyström solver's error in its solver comparison was "near 1"
(the block prints 0.33; its residual, "several times ||b||", is 5.8), and
guide/modes.md commented ``# double_math ~1e-10`` on a print of 1.5e-8 (the relative
difference between first-order and double-backward products through 4 SGD steps of a
transformer layer, in float64).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_docs import DOCS, python_blocks  # noqa: E402


def _output(page: Path, index: int) -> str:
    block = python_blocks(page)[index]
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    torch.set_num_threads(1)  # as tests/test_docs.py runs it
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            exec(compile(block.code, block.name, "exec"), {"__name__": "__docs__"})
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(state)
    return out.getvalue()


def test_which_method_solver_comparison_prints_what_the_text_says():
    page = DOCS / "which-method.md"
    printed = {}
    for line in _output(page, 0).splitlines():
        m = re.match(r"(\w+)\s+(\d+) products\s+relative error (\S+)\s+residual (\S+)", line)
        assert m is not None, line
        printed[m.group(1)] = (float(m.group(3)), float(m.group(4)), "(warned)" in line)
    assert set(printed) == {"CG", "Neumann", "Nystrom", "NystromPCG"}
    text = re.sub(r"\s+", " ", page.read_text(encoding="utf-8"))
    claim = re.search(
        r"prints relative errors of (\S+) \(CG\), (\S+) \(Neumann\), (\S+) \(Nystrom\) and "
        r"(\S+) \(NystromPCG\)",
        text,
    )
    assert claim is not None
    quoted = [float(x) for x in claim.groups()]
    # two significant digits, to within one unit of the second: the block's float32 CG
    # prints 6.5e-3 on one CPU and 6.4e-3 on another (vectorized reductions round apart)
    for q, k in zip(quoted, ("CG", "Neumann", "Nystrom", "NystromPCG")):
        assert q == pytest.approx(printed[k][0], rel=0.04), k
    residual = re.search(r"relative residual `\|\|b - H x\|\| / \|\|b\|\|` of ([\d.]+)", text)
    assert residual is not None
    assert float(residual.group(1)) == pytest.approx(printed["Nystrom"][1], abs=0.05)
    assert printed["Nystrom"][1] > 1 and printed["Nystrom"][2]  # worse than x = 0, warned
    ratio = re.search(r"an error (\d+) times CG's", text)
    assert ratio is not None
    assert int(ratio.group(1)) == pytest.approx(printed["Nystrom"][0] / printed["CG"][0], rel=0.1)
    assert not any(printed[k][2] for k in ("CG", "NystromPCG"))


def test_modes_comment_is_the_printed_difference():
    page = DOCS / "guide" / "modes.md"
    block = python_blocks(page)[0]
    comment = re.search(r"# double_math ~(\S+)", block.code)
    assert comment is not None
    mode, difference = _output(page, 0).split()
    assert mode == "double_math"
    assert float(difference) == pytest.approx(float(comment.group(1)), rel=0.35)


def test_tutorial_ift_series_length_is_the_default():
    """own-training-loop.md called IFT's default a "10-term" series; it takes 10 products
    and sums 11 terms (alpha sum_{j<=10} (I - alpha H)^j b), as the record shows."""
    import hypergradient as hg

    text = re.sub(r"\s+", " ", (DOCS / "tutorials" / "own-training-loop.md").read_text())
    found = re.search(r"Neumann series of (\d+) products \((\d+) terms", text)
    assert found is not None
    products, terms = int(found.group(1)), int(found.group(2))
    method = hg.IFT()
    assert method.solver.maxiter == products and terms == products + 1
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    b = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    sol = hg.Neumann(products, alpha=0.1).solve(hg.MatrixOperator(A), b)
    M = torch.eye(3, dtype=torch.float64) - 0.1 * A
    series = 0.1 * sum(torch.linalg.matrix_power(M, j) @ b for j in range(terms))
    assert sol.num_hvps == products
    torch.testing.assert_close(sol.value, series, rtol=1e-13, atol=1e-15)
