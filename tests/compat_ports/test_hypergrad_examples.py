"""hypergrad 0.0.1's examples and Solver tutorial, run on hypergradient.compat.hypergrad.

The example modules (hypergrad_logistic_regression.py, hypergrad_dataset_distillation.py)
are hypergrad's with only the import lines changed; the set-up below is their ``__main__``
block with smaller sizes (and, for distillation, scikit-learn's digits instead of MNIST).
The tutorial's code (hypergrad's docs/solver.md, Copyright (c) 2023-present Ryuichiro
Hataya, MIT License; see LICENSE-hypergrad.txt here) is ported in ``TutorialSolver`` with
its import lines changed and its undefined names (data, sizes) filled in.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import hypergrad_dataset_distillation as distillation
import hypergrad_logistic_regression as logreg
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import SGD
from torch.utils.data import DataLoader, random_split

import hypergradient as hg
from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient, neumann, nystrom
from hypergradient.compat.hypergrad.functorch import grad_and_value, make_functional
from hypergradient.compat.hypergrad.optimizers import diff_sgd
from hypergradient.compat.hypergrad.solver import BaseImplicitSolver
from hypergradient.compat.hypergrad.utils import Params

CPU = torch.device("cpu")


def dense_logreg_hypergradient(in_params, out_params, inner_data, outer_data):
    """The exact implicit hypergradient of the example's problem (dense float64 solve)."""
    w = in_params[0].detach().double().reshape(-1)
    lam = out_params[0].detach().double().reshape(-1)
    (xi, yi), (xo, yo) = inner_data, outer_data
    xi, yi, xo, yo = xi.double(), yi.double().reshape(-1), xo.double(), yo.double().reshape(-1)

    def f(w, lam):
        return F.binary_cross_entropy_with_logits(xi @ w, yi) + (w**2 * lam).sum() / 2

    def g(w):
        return F.binary_cross_entropy_with_logits(xo @ w, yo)

    H = torch.func.hessian(f)(w, lam)
    M = torch.func.jacrev(torch.func.grad(f), argnums=1)(w, lam)
    return -M.T @ torch.linalg.solve(H, torch.func.grad(g)(w))


@pytest.mark.parametrize("method", ["cg", "neumann", "nystrom"])
def test_logistic_regression_example(method):
    # the example's __main__, with num_data 1000 -> 200, dim_data 100 -> 10, num_iters
    # 1000 -> 61, unroll_steps 100 -> 10 (6 outer updates); cost 5 (CG: 10, exact)
    torch.random.manual_seed(1)
    num_data, dim_data, alpha = 200, 10, 0.1
    cost = dim_data if method == "cg" else 5
    train_data, val_data = logreg.generate_data(num_data, dim_data)
    model = nn.Linear(dim_data, 1, bias=False)
    nn.init.zeros_(model.weight)
    hyper = copy.deepcopy(model)
    nn.init.ones_(hyper.weight)
    inner_optimizer = functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.1)
    outer_optimizer = torch.optim.SGD(hyper.parameters(), weight_decay=0, momentum=0.9, lr=1)
    approx_ihvp = {
        "neumann": functools.partial(neumann, num_iters=cost, lr=alpha),
        "cg": functools.partial(conjugate_gradient, num_iters=cost, lr=alpha),
        "nystrom": functools.partial(nystrom, rank=cost, rho=alpha),
    }[method]
    calls = []

    def recorded(inner_obj, outer_obj, in_params, out_params):
        out = approx_ihvp(inner_obj, outer_obj, in_params, out_params)
        calls.append(
            (tuple(p.clone() for p in in_params), tuple(p.clone() for p in out_params), out)
        )
        return out

    solver = logreg.Solver(
        model,
        hyper,
        [train_data],
        [val_data],
        recorded,
        inner_optimizer=inner_optimizer,
        outer_optimizer=outer_optimizer,
        num_iters=61,
        unroll_steps=10,
        device=CPU,
    )
    solver.run()
    assert solver.inner_step == 61 and solver.outer_step == 6 and len(calls) == 6
    assert len(solver.recorder.archive["outer_loss"]) == 6
    assert len(solver.recorder.archive["inner_loss"]) == 61
    assert bool((hyper.weight >= 1e-8).all()) and not torch.equal(hyper.weight, torch.ones(1, 10))
    assert torch.equal(model.weight, solver.inner_params[0])  # sync_inner copied them
    if method == "cg":  # n CG iterations on n unknowns: the exact hypergradient
        in_params, out_params, out = calls[0]
        exact = dense_logreg_hypergradient(in_params, out_params, train_data, val_data)
        assert torch.allclose(out[0].double().reshape(-1), exact, rtol=1e-4, atol=1e-7)


# LeNet at its random initialization is not at a minimum of the inner loss: CG meets
# non-positive curvature and says so (HypergradientWarning); hypergrad stepped uphill.
def test_dataset_distillation_example_on_digits():
    # the example's __main__ with num_iters 500_000 -> 9, unroll_steps 100 -> 4 (2 outer
    # updates), num_per_class 5 -> 1, batches of 1024 -> 256, cost 5 (CG)
    torch.random.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.LeakyReLU(),
        nn.Linear(120, 84),
        nn.LeakyReLU(),
        nn.Linear(84, 10),
    )
    hyper = distillation.DistilledData(1)
    start = hyper.data.detach().clone()
    dataset = distillation.digits_dataset()
    train_set, val_set = random_split(
        dataset, (1600, len(dataset) - 1600), generator=torch.Generator().manual_seed(0)
    )
    data_loader = DataLoader(train_set, batch_size=256, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256, shuffle=True)
    approx_ihvp = functools.partial(conjugate_gradient, num_iters=5, lr=0.1)
    solver = distillation.Solver(
        model,
        hyper,
        [],
        data_loader,
        approx_ihvp,
        9,
        4,
        inner_optimizer=functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.01),
        outer_optimizer=torch.optim.Adam(hyper.parameters(), lr=1e-3, betas=(0.9, 0.999)),
        val_loader=val_loader,
        device=CPU,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hg.HypergradientWarning)
        solver.run()
    curvature = [w for w in caught if "non-positive curvature" in str(w.message)]
    archive = solver.recorder.archive
    assert solver.outer_step == 2 and len(archive["val_acc"]) == 2
    assert len(archive["inner_loss"]) == 9 and len(archive["outer_acc"]) == 2
    moved = (hyper.data.detach() - start).abs()
    assert bool(torch.isfinite(hyper.data).all())
    # Either the hypergradient moved the data, or CG met negative curvature at its first
    # direction (x = 0 is then its best iterate: the data's hypergradient is zero) and said so.
    assert float(moved.max()) > 0 or curvature
    # Adam's first steps move every pixel with a nonzero hypergradient by ~lr
    assert float(moved.max()) <= 2.1e-3
    acc = distillation.test(solver.inner_func, solver.inner_params, val_loader)
    assert 0.0 <= acc <= 1.0


# ---- hypergrad's docs/solver.md, with its import lines changed
class TutorialSolver(BaseImplicitSolver):
    def inner_forward(
        self, in_params: Params, out_params: Params, input: Tensor, target: Tensor
    ) -> Tensor:
        # forward computation of the inner problem
        output = self.inner_func(in_params, input)
        loss = F.binary_cross_entropy_with_logits(output, target)
        weight_decay = sum([(_in.pow(2) * _out).sum() for _in, _out in zip(in_params, out_params)])
        return loss + weight_decay / 2  # (1)

    def inner_update(self) -> None:
        # update rule of the inner problem
        input, target = next(self.inner_loader)  # (2)
        grads, loss = grad_and_value(self.inner_forward)(
            self.inner_params, tuple(self.outer.parameters()), input, target
        )
        self.inner_params, self.inner_optim_state = self.inner_optimizer(
            self.inner_params, grads, self.inner_optim_state
        )

    def outer_forward(
        self, in_params: Params, out_params: Params, input: Tensor, target: Tensor
    ) -> Tensor:
        # forward computation of the outer problem
        output = self.inner_func(in_params, input)  # (3)
        return F.binary_cross_entropy_with_logits(output, target)

    def outer_update(self) -> None:
        # update rule of the outer problem
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        _, out_params = make_functional(self.outer, disable_autograd_tracking=True)

        # compute implicit gradients
        implicit_grads = self.approx_ihvp(
            lambda i, o: self.inner_forward(i, o, in_input, in_target),
            lambda i, o: self.outer_forward(i, o, out_input, out_target),
            self.inner_params,
            out_params,
        )

        self.outer_grad = implicit_grads  # (4)
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)


def test_solver_tutorial():
    torch.random.manual_seed(0)
    dim_data, num_iters, unroll_steps = 8, 31, 10  # undefined in the tutorial
    (x, y), (xv, yv) = logreg.generate_data(200, dim_data)
    inner_loader, outer_loader = [(x[:50], y[:50]), (x[50:], y[50:])], [(xv, yv)]

    inner = nn.Linear(dim_data, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = copy.deepcopy(inner)
    nn.init.ones_(outer.weight)

    inner_optimizer = functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.1)
    outer_optimizer = SGD(outer.parameters(), weight_decay=0, momentum=0.9, lr=1)

    approx_ihvp = functools.partial(nystrom, rank=5, rho=0.1)
    solver = TutorialSolver(
        inner,
        outer,
        inner_loader,
        outer_loader,
        approx_ihvp,
        inner_optimizer=inner_optimizer,
        outer_optimizer=outer_optimizer,
        num_iters=num_iters,
        unroll_steps=unroll_steps,
        outer_patience_iters=0,
        device=CPU,
    )
    solver.run()
    assert solver.outer_step == 3
    assert not torch.equal(outer.weight, torch.ones(1, dim_data))
    assert bool(torch.isfinite(outer.weight).all())
    assert math.isfinite(float(inner.weight.detach().sum()))
