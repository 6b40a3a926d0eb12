"""hypergrad 0.0.1 *as released on PyPI* (not the repository's head, which renamed things).

The release's own example (``examples/logistic_regression.py`` at the released commit) writes
its solver with ``inner_obj``/``outer_obj`` returning ``(loss, output)``, ``f_model``,
``f_params``, ``f_optim_state``, ``set_out_grad`` and ``functorch_requires_grad``; its
``utils`` has ``vector_to_tree``. Before the aliases, such a solver could not even be
instantiated ("Can't instantiate abstract class ... inner_forward, outer_forward").
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hypergradient.compat.hypergrad import functorch
from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient
from hypergradient.compat.hypergrad.optimizers import diff_sgd
from hypergradient.compat.hypergrad.solver import BaseImplicitSolver
from hypergradient.compat.hypergrad.utils import vector_to_tree

D = 6


class ReleaseSolver(BaseImplicitSolver):
    """The release's logistic-regression solver, verbatim apart from the recording of the
    hypergradients it sets (and the point they were taken at) for the test."""

    seen: list

    def inner_update(self):
        input, target = next(self.inner_loader)
        grads, (loss, output) = functorch.grad_and_value(self.inner_obj, has_aux=True)(
            self.f_params, tuple(self.outer.parameters()), input, target
        )
        self.f_params, self.f_optim_state = self.inner_optimizer(
            list(self.f_params), list(grads), self.f_optim_state
        )
        self.recorder.add("inner_loss", loss.detach())

    def inner_obj(self, in_params, out_params, input, target):
        output = self.f_model(in_params, input)
        loss = F.binary_cross_entropy_with_logits(output, target)
        wd = sum([(_in.pow(2) * _out).sum() for _in, _out in zip(in_params, out_params)])
        return loss + wd / 2, output

    def outer_update(self):
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        in_params = tuple(self.f_params)
        _, out_params = functorch.make_functional(self.outer, disable_autograd_tracking=True)
        implicit_grads = self.approx_ihvp(
            lambda i, o: self.inner_obj(i, o, in_input, in_target)[0],
            lambda i, o: self.outer_obj(i, o, out_input, out_target)[0],
            in_params,
            out_params,
        )
        self.set_out_grad(implicit_grads)
        self.seen.append(
            (
                in_params[0].detach().clone(),
                out_params[0].detach().clone(),
                self.outer.weight.grad.clone(),
                self.global_step,
            )
        )
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)

    def outer_obj(self, in_params, out_params, input, target):
        output = self.f_model(in_params, input)
        return F.binary_cross_entropy_with_logits(output, target), output

    def post_outer_update(self):
        self.f_params[0].zero_()
        self.f_params[0].detach_()
        for p in self.outer.parameters():
            p.data.clamp_(min=1e-8)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, D, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(D, generator=g, dtype=torch.float64) > 0).double()[:, None]
    return (x[:40], y[:40]), (x[40:], y[40:])


def _dense(w, lam, train, val):
    """Dense float64 implicit hypergradient -diag(w) H^{-1} grad g of the example."""
    (x, y), (xv, yv) = train, val
    w = w.reshape(-1)

    def f(w):
        return F.binary_cross_entropy_with_logits(x @ w[:, None], y) + 0.5 * (lam * w**2).sum()

    def g(w):
        return F.binary_cross_entropy_with_logits(xv @ w[:, None], yv)

    h = torch.autograd.functional.hessian(f, w)
    gw = torch.autograd.functional.jacobian(g, w)
    return -(w * torch.linalg.solve(h, gw))


def test_the_released_example_runs_and_sets_the_exact_hypergradient():
    train, val = _data()
    model = nn.Linear(D, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    hyper = nn.Linear(D, 1, bias=False).double()
    nn.init.ones_(hyper.weight)
    solver = ReleaseSolver(
        model,
        hyper,
        [train],
        [val],
        functools.partial(conjugate_gradient, num_iters=D, lr=0.1),  # D iterations: exact
        inner_optimizer=functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.5),
        outer_optimizer=torch.optim.SGD(hyper.parameters(), lr=1.0, momentum=0.9),
        num_iters=61,
        unroll_steps=20,
        device=torch.device("cpu"),
        functorch_requires_grad=False,
    )
    solver.seen = []
    solver.run()
    assert solver.outer_step == 3 and solver.inner_step == 61 and solver.global_step == 61
    assert [s[3] for s in solver.seen] == [20, 40, 60]  # global_step inside the outer update
    for w, lam, grad, _ in solver.seen:
        ref = _dense(w, lam.reshape(-1), train, val)
        assert torch.allclose(grad.reshape(-1), ref, rtol=1e-8, atol=1e-12)
    assert not torch.equal(hyper.weight, torch.ones_like(hyper.weight))  # tuned
    # the aliases are the head's attributes
    assert solver.f_params is solver.inner_params and solver.f_model is solver.inner_func
    assert solver.f_optim_state is solver.inner_optim_state


def test_functorch_requires_grad_is_the_released_name_of_inner_requires_grad():
    train, val = _data()
    for flag in (False, True):
        solver = ReleaseSolver(
            nn.Linear(D, 1).double(),
            nn.Linear(D, 1).double(),
            [train],
            [val],
            conjugate_gradient,
            num_iters=2,
            unroll_steps=1,
            inner_optimizer=diff_sgd,
            outer_optimizer=None,
            device=torch.device("cpu"),
            functorch_requires_grad=flag,
        )
        assert all(p.requires_grad is flag for p in solver.f_params)
        assert solver._functorch_requires_grad is flag  # the release's example reads it
    with pytest.raises(ValueError, match="functorch_requires_grad"):
        ReleaseSolver(
            nn.Linear(D, 1),
            nn.Linear(D, 1),
            [train],
            [val],
            conjugate_gradient,
            num_iters=2,
            unroll_steps=1,
            inner_optimizer=diff_sgd,
            outer_optimizer=None,
            functorch_requires_grad="yes",
        )


def test_a_solver_without_objectives_is_refused_naming_both_names():
    class NoObjective(BaseImplicitSolver):
        def inner_update(self):
            pass

        def outer_update(self):
            pass

        def inner_obj(self, *args):
            return torch.zeros(())

    train, val = _data()
    with pytest.raises(TypeError, match="outer_forward.*outer_obj"):
        NoObjective(
            nn.Linear(D, 1),
            nn.Linear(D, 1),
            [train],
            [val],
            conjugate_gradient,
            2,
            1,
            diff_sgd,
            None,
        )


def test_head_and_release_objective_names_reach_the_same_method():
    class Head(BaseImplicitSolver):
        def inner_update(self):
            pass

        def outer_update(self):
            pass

        def inner_forward(self, i, o, x, t):
            return 1.0

        def outer_forward(self, i, o, x, t):
            return 2.0

    train, val = _data()
    s = Head(
        nn.Linear(D, 1), nn.Linear(D, 1), [train], [val], conjugate_gradient, 2, 1, diff_sgd, None
    )
    assert s.inner_obj(0, 0, 0, 0) == 1.0 and s.outer_obj(0, 0, 0, 0) == 2.0


def test_vector_to_tree_is_the_released_name():
    params = (torch.zeros(2, 3), torch.zeros(4))
    vec = torch.arange(10.0)
    out = vector_to_tree(vec, params)
    assert [tuple(t.shape) for t in out] == [(2, 3), (4,)]
    assert torch.equal(torch.cat([t.reshape(-1) for t in out]), vec)
