"""hypergrad 0.0.1 *as released on PyPI* ends its constructors with
``..., log_freq, functorch_requires_grad, device``; the repository's head (whose order the
compat solver has) put ``outer_requires_grad`` (``BaseSolver``) or ``skip_sync_inner``
(``BaseImplicitSolver``) where the release has ``device``. A release user's call giving every
argument by position raised "`skip_sync_inner` must be True or False, got device(type='cpu')".
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hypergradient.compat.hypergrad import functorch
from hypergradient.compat.hypergrad.approx_hypergrad import neumann
from hypergradient.compat.hypergrad.optimizers import diff_sgd
from hypergradient.compat.hypergrad.solver import BaseImplicitSolver, BaseSolver


class Ridge(BaseImplicitSolver):
    """One decay per weight; a single batch, so that the hypergradient has a closed form."""

    def inner_obj(self, in_params, out_params, input, target):
        (w,), (lam,) = in_params, out_params
        return (
            0.5 * ((self.f_model(in_params, input).squeeze(-1) - target) ** 2).mean()
            + 0.5 * (lam * w.view(-1) ** 2).sum()
        )

    def outer_obj(self, in_params, out_params, input, target):
        return 0.5 * ((self.f_model(in_params, input).squeeze(-1) - target) ** 2).mean()

    def inner_update(self):
        input, target = next(self.inner_loader)
        grads = functorch.grad(self.inner_obj)(
            self.f_params, tuple(self.outer.parameters()), input, target
        )
        self.f_params, self.f_optim_state = self.inner_optimizer(
            list(self.f_params), grads, self.f_optim_state
        )

    def outer_update(self):
        (xi, yi), (xo, yo) = next(self.inner_loader), next(self.outer_loader)
        _, out_params = functorch.make_functional(self.outer, disable_autograd_tracking=True)
        self.seen.append((tuple(p.detach().clone() for p in self.f_params), out_params[0].clone()))
        self.set_out_grad(
            self.approx_ihvp(
                lambda i, o: self.inner_obj(i, o, xi, yi),
                lambda i, o: self.outer_obj(i, o, xo, yo),
                tuple(self.f_params),
                out_params,
            )
        )
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)


def _problem():
    torch.manual_seed(0)
    X, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    Xv, yv = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    inner = nn.Linear(3, 1, bias=False).double()
    outer = nn.Linear(3, 1, bias=False).double()
    nn.init.constant_(outer.weight, 0.5)
    return X, y, Xv, yv, inner, outer


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu"])
def test_implicit_solver_takes_the_release_positional_device(device):
    X, y, Xv, yv, inner, outer = _problem()
    solver = Ridge(
        inner,
        outer,
        [(X, y)],
        [(Xv, yv)],
        functools.partial(neumann, num_iters=400, lr=1.0),
        21,
        10,
        functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.5),
        torch.optim.SGD(outer.parameters(), lr=0.1),
        0,
        logging.getLogger("t"),
        100,
        False,
        device,  # the release's `device`, by position
    )
    solver.seen = []
    assert solver.device == torch.device("cpu") and solver._skip_sync_inner is False
    solver.run()
    assert len(solver.seen) == 2
    (w,), lam = solver.seen[0]
    # the hypergradient the first outer step applied, against the dense implicit formula
    H = X.T @ X / 40 + torch.diag(lam.view(-1))
    gv = Xv.T @ (Xv @ w.view(-1) - yv) / 30
    ref = -w.view(-1) * torch.linalg.solve(H, gv)
    (_, lam1) = solver.seen[1]
    assert torch.allclose((lam - lam1).view(-1) / 0.1, ref, rtol=1e-9, atol=1e-12)


def test_base_solver_takes_the_release_positional_device():
    class Plain(BaseSolver):
        def inner_obj(self, in_params, out_params, input, target):
            return F.mse_loss(self.f_model(in_params, input).squeeze(-1), target)

        def outer_obj(self, in_params, out_params, input, target):
            return self.inner_obj(in_params, out_params, input, target)

        def inner_update(self):
            pass

        def outer_update(self):
            pass

    X, y, _, _, inner, outer = _problem()
    opt = torch.optim.SGD(outer.parameters(), lr=0.1)
    s = Plain(inner, outer, [(X, y)], [(X, y)], 4, 2, None, opt, 0, None, 100, False, "cpu")
    assert s.device == torch.device("cpu")
    assert not any(p.requires_grad for p in outer.parameters())  # outer_requires_grad: False
    # the head's order is unchanged: a flag there is still that flag
    s = Plain(inner, outer, [(X, y)], [(X, y)], 4, 2, None, opt, 0, None, 100, False, True)
    assert all(p.requires_grad for p in outer.parameters())
