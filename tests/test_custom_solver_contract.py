"""A ``Solver`` of one's own whose ``solve`` returns the wrong thing is named at once, with the
contract (a ``Solution`` whose value is a floating-point tensor shaped like ``b``), instead
of surfacing later as an operator's shape error; a right one gives the dense answer."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import Solution, Solver

D = torch.float64
g = torch.Generator().manual_seed(0)
X, y = torch.randn(30, 4, generator=g, dtype=D), torch.randn(30, generator=g, dtype=D)
A = X.T @ X / 30


def f(t, h):
    return ((X @ t - y) ** 2).mean() + h * (t**2).sum()


def outer(t, h):
    return ((X @ t) ** 2).mean()


THETA = torch.linalg.solve(A + 0.1 * torch.eye(4, dtype=D), X.T @ y / 30)


class Dense(Solver):
    def __init__(self, kind: str = "ok"):
        self.kind = kind

    def solve(self, op, b, x0=None):
        x = torch.linalg.solve(op.dense(), b)
        value = {"column": x[:, None], "short": x[:-1], "list": x.tolist()}.get(self.kind, x)
        return Solution(value, op.size, None, True, "converged", 1) if self.kind else x


def test_a_right_solver_gives_the_dense_hypergradient():
    H = 2 * A + 0.2 * torch.eye(4, dtype=D)  # the Hessian of f at THETA
    b = 2 * A @ THETA  # grad of the outer loss
    expected = -(2 * THETA) @ torch.linalg.solve(H, b)  # d/dh of grad f = 2 theta
    got = hg.implicit(f, outer, THETA, torch.tensor(0.1, dtype=D), Dense())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["column", "short", "list", ""])
def test_a_wrong_solution_is_named_with_the_contract(kind):
    with pytest.raises(ValueError, match=r"Dense\(.*\)\.solve\(op, b, x0\) must return a Solution"):
        hg.implicit(f, outer, THETA, torch.tensor(0.1, dtype=D), Dense(kind))
