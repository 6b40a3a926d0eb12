"""Measure hypergrad's conjugate_gradient against textbook CG on its logistic-regression example.

Runs the ported example (hypergrad_logistic_regression.py, its default sizes: 1,000 points,
100 features, 1,000 inner steps, an outer update every 100, CG cost 5, alpha 0.1) and, at
every outer update, computes at the same point the hypergradient of hypergrad 0.0.1's
``conjugate_gradient``, of ``hypergradient.compat.hypergrad``'s (textbook CG) and the exact
one (dense float64 solve). Then trains the example with each, at outer learning rates 1
(the example's) and larger ones, and reports the final validation loss.

Needs the original for the comparison (never a dependency of this package):

    .venv/bin/pip install --no-deps hypergrad==0.0.1
    .venv/bin/python tests/compat_ports/measure_cg_magnitude.py [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
import hypergrad_logistic_regression as ex  # noqa: E402

from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient  # noqa: E402


def exact_hypergradient(in_params, out_params, inner_data, outer_data):
    """Dense float64 implicit hypergradient of the example's problem."""
    w = in_params[0].detach().double().reshape(-1)
    lam = out_params[0].detach().double().reshape(-1)
    (xi, yi), (xo, yo) = inner_data, outer_data
    xi, xo = xi.double(), xo.double()
    yi, yo = yi.double().reshape(-1), yo.double().reshape(-1)

    def f(w, lam):
        return F.binary_cross_entropy_with_logits(xi @ w, yi) + (w**2 * lam).sum() / 2

    def g(w):
        return F.binary_cross_entropy_with_logits(xo @ w, yo)

    H = torch.func.hessian(f)(w, lam)
    M = torch.func.jacrev(torch.func.grad(f), argnums=1)(w, lam)
    return -M.T @ torch.linalg.solve(H, torch.func.grad(g)(w))


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def run(seed, approx, outer_lr, probe=None, args=None):
    """The example's __main__ with ``approx`` as approx_ihvp; returns the final val loss."""
    torch.random.manual_seed(seed)
    train_data, val_data = ex.generate_data(args.num_data, args.dim_data)
    model = nn.Linear(args.dim_data, 1, bias=False)
    nn.init.zeros_(model.weight)
    hyper = copy.deepcopy(model)
    nn.init.ones_(hyper.weight)
    inner_optimizer = functools.partial(ex.diff_sgd, momentum=0, weight_decay=0, lr=0.1)
    outer_optimizer = torch.optim.SGD(hyper.parameters(), weight_decay=0, momentum=0.9, lr=outer_lr)

    def approx_ihvp(inner_obj, outer_obj, in_params, out_params):
        out = approx(inner_obj, outer_obj, in_params, out_params)
        if probe is not None:
            probe(inner_obj, outer_obj, in_params, out_params, train_data, val_data)
        return out

    solver = ex.Solver(
        model,
        hyper,
        [train_data],
        [val_data],
        approx_ihvp,
        inner_optimizer=inner_optimizer,
        outer_optimizer=outer_optimizer,
        num_iters=args.num_iters,
        unroll_steps=args.unroll_steps,
        device=torch.device("cpu"),
    )
    solver.run()
    w = solver.inner_params[0].detach()
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(val_data[0] @ w.T, val_data[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--num_data", type=int, default=1000)
    p.add_argument("--dim_data", type=int, default=100)
    p.add_argument("--num_iters", type=int, default=1000)
    p.add_argument("--unroll_steps", type=int, default=100)
    p.add_argument("--cost", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--lrs", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    p.add_argument("--their_lrs", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--grid", action="store_true", help="only the ratio, over --costs x --alphas")
    p.add_argument("--costs", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = p.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    if args.grid:
        grid(args)
        return
    from hypergrad.approx_hypergrad import conjugate_gradient as theirs_cg

    ours = functools.partial(conjugate_gradient, num_iters=args.cost, lr=args.alpha)
    theirs = functools.partial(theirs_cg, num_iters=args.cost, lr=args.alpha)
    ratios, cos_ours, cos_theirs = [], [], []

    def probe(inner_obj, outer_obj, in_params, out_params, train_data, val_data):
        a = ours(inner_obj, outer_obj, in_params, out_params)[0].reshape(-1).double()
        b = theirs(inner_obj, outer_obj, in_params, out_params)[0].reshape(-1).double()
        exact = exact_hypergradient(in_params, out_params, train_data, val_data)
        ratios.append(float(b.norm() / a.norm()))
        cos_ours.append(cosine(a, exact))
        cos_theirs.append(cosine(b, exact))

    for seed in args.seeds:
        run(seed, ours, 1.0, probe, args)
    print(f"torch {torch.__version__}; seeds {args.seeds}; {len(ratios)} outer updates")
    print(
        f"||hypergrad CG|| / ||textbook CG||: min {min(ratios):.1f}, median "
        f"{statistics.median(ratios):.1f}, max {max(ratios):.1f}"
    )
    print(
        f"cosine with the exact hypergradient: textbook CG median "
        f"{statistics.median(cos_ours):.3f} (min {min(cos_ours):.3f}); hypergrad CG median "
        f"{statistics.median(cos_theirs):.3f} (min {min(cos_theirs):.3f})"
    )
    print("final validation loss (mean over seeds) after the example's run:")
    untuned = statistics.mean(
        run(s, lambda *a: tuple(torch.zeros_like(t) for t in a[3]), 1.0, None, args)
        for s in args.seeds
    )
    print(f"  no outer update: {untuned:.4f}")
    for name, fn, lrs in (
        ("hypergrad CG", theirs, args.their_lrs),
        ("textbook CG", ours, args.lrs),
    ):
        for lr in lrs:
            losses = [run(s, fn, lr, None, args) for s in args.seeds]
            print(f"  {name}, outer lr {lr:g}: {statistics.mean(losses):.4f}")


def grid(args) -> None:
    """The norm ratio over CG costs and alphas (the example's --cost and --alpha)."""
    from hypergrad.approx_hypergrad import conjugate_gradient as theirs_cg

    print("| cost | alpha | min | median | max |\n|---|---|---|---|---|")
    for cost in args.costs:
        for alpha in args.alphas:
            ours = functools.partial(conjugate_gradient, num_iters=cost, lr=alpha)
            theirs = functools.partial(theirs_cg, num_iters=cost, lr=alpha)
            ratios = []

            def probe(
                inner_obj,
                outer_obj,
                in_params,
                out_params,
                *_,
                ours=ours,
                theirs=theirs,
                ratios=ratios,
            ):
                a = ours(inner_obj, outer_obj, in_params, out_params)[0]
                b = theirs(inner_obj, outer_obj, in_params, out_params)[0]
                ratios.append(float(b.norm() / a.norm()))

            for seed in args.seeds:
                run(seed, ours, 1.0, probe, args)
            print(
                f"| {cost} | {alpha:g} | {min(ratios):.1f} | {statistics.median(ratios):.1f} "
                f"| {max(ratios):.1f} |"
            )


if __name__ == "__main__":
    main()
