"""hypergrad's ``BaseSolver.run`` drives the user's ``inner_update``; with a learning rate
above ``2 / lambda_max`` (ridge regression, whose Hessian is known exactly) the inner
weights grow geometrically and ``outer_update`` differentiates a run that trains nothing:
the decays moved from 1 to 1.3e3 (``lr = 3 / lambda_max``) or 1.8e5 (``3.5``) before the
weights overflowed, without a word. ``run`` now watches the last inner updates before each
outer update as ``hg.HyperOptimizer`` does: sustained growth warns, non-finite inner
parameters raise before ``outer_update`` changes anything."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from hypergradient import HypergradientWarning, NonFiniteHypergradientError
from hypergradient.compat.hypergrad import functorch
from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient
from hypergradient.compat.hypergrad.optimizers import diff_sgd
from hypergradient.compat.hypergrad.solver import BaseImplicitSolver

DT = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(400, 20, generator=g, dtype=DT)
Y = (X @ torch.randn(20, generator=g, dtype=DT))[:, None]
LAMBDA_MAX = float(torch.linalg.eigvalsh(2 * X[:200].T @ X[:200] / 200 + torch.eye(20)).max())


class Solver(BaseImplicitSolver):  # hypergrad's documented Solver, on a squared loss
    def inner_forward(self, in_params, out_params, input, target):
        wd = sum((i.pow(2) * o).sum() for i, o in zip(in_params, out_params))
        return ((self.inner_func(in_params, input) - target) ** 2).mean() + wd / 2

    def inner_update(self):
        input, target = next(self.inner_loader)
        grads = functorch.grad(self.inner_forward)(
            self.inner_params, tuple(self.outer.parameters()), input, target
        )
        self.inner_params, self.inner_optim_state = self.inner_optimizer(
            self.inner_params, grads, self.inner_optim_state
        )

    def outer_forward(self, in_params, out_params, input, target):
        return ((self.inner_func(in_params, input) - target) ** 2).mean()

    def outer_update(self):
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        _, out_params = functorch.make_functional(self.outer, disable_autograd_tracking=True)
        self.outer_grad = self.approx_ihvp(
            lambda i, o: self.inner_forward(i, o, in_input, in_target),
            lambda i, o: self.outer_forward(i, o, out_input, out_target),
            self.inner_params,
            out_params,
        )
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)


def _solver(lr_factor, num_iters):
    inner = nn.Linear(20, 1, bias=False).double()
    nn.init.zeros_(inner.weight)
    outer = copy.deepcopy(inner)
    nn.init.ones_(outer.weight)
    solver = Solver(
        inner,
        outer,
        [(X[:200], Y[:200])],
        [(X[200:], Y[200:])],
        functools.partial(conjugate_gradient, num_iters=10, lr=1.0),
        num_iters=num_iters,
        unroll_steps=10,
        inner_optimizer=functools.partial(
            diff_sgd, momentum=0, weight_decay=0, lr=lr_factor / LAMBDA_MAX
        ),
        outer_optimizer=torch.optim.SGD(outer.parameters(), lr=0.1),
        device=torch.device("cpu"),
    )
    return solver, outer


def test_a_diverging_inner_run_warns_before_the_outer_update():
    solver, outer = _solver(3.5, 11)
    with pytest.warns(HypergradientWarning, match=r"Solver, step 10: The inner run is diverging"):
        solver.run()
    assert solver.outer_step == 1


def test_non_finite_inner_parameters_raise_before_the_outer_update():
    solver, outer = _solver(0.5, 11)
    update = solver.inner_update

    def poisoned():  # the tenth inner update overflows
        update()
        if solver.inner_step == 10:
            solver.inner_params = (torch.full_like(solver.inner_params[0], float("inf")),)

    solver.inner_update = poisoned
    before = outer.weight.detach().clone()
    with pytest.raises(NonFiniteHypergradientError, match="not finite"):
        solver.run()
    assert solver.outer_step == 0 and torch.equal(outer.weight, before)


def test_a_stable_run_does_not_warn():
    solver, outer = _solver(0.5, 21)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        solver.run()
    assert solver.outer_step == 2
