"""What a hyper-step costs in training steps, for every method of the HyperOptimizer."""

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import harness as H
import hypergradient as hg

NAME, TITLE = "hyperstep_cost", "Hyper-step cost in training steps, every HyperOptimizer method"
K = 10  # inner_steps
IFT_GOAL = lambda k, m: k + 3.0  # noqa: E731
METHODS = {  # name: (factory, goal in training steps for k products and m hyperparameters)
    "T1T2()": (hg.T1T2, lambda k, m: 2.0),
    "IFT() (Neumann, 10 terms)": (hg.IFT, IFT_GOAL),
    "IFT(CG(maxiter=10, tol=0))": (lambda: hg.IFT(hg.CG(maxiter=10, tol=0.0)), IFT_GOAL),
    "HOAG(maxiter=10)": (lambda: hg.HOAG(maxiter=10), IFT_GOAL),
    "Unrolled()": (hg.Unrolled, lambda k, m: 4.0 * K),
    "DrMAD()": (hg.DrMAD, lambda k, m: 4.0 * K),
    "ForwardMode()": (hg.ForwardMode, lambda k, m: (2.0 + m) * K),
    # without the probe tangent of its instability check: the m tangents the goal counts
    "ForwardMode(watch=False)": (lambda: hg.ForwardMode(watch=False), lambda k, m: (2.0 + m) * K),
}


class Encoder(nn.Module):
    """A pre-built transformer encoder (fused attention, dropout 0.1) over ``(batch,
    tokens, features)``, mean-pooled into 10 logits."""

    def __init__(self, features: int, width: int, layers: int):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, 0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def problems(seed: int, quick: bool) -> list[tuple[str, tuple]]:
    """``[(name, (model factory, train, val, loss, decay shape))]``; mnist-mlp twice: with
    its whole validation split as the validation batch (twice the training batch), and with
    a validation batch of the training batch's size (the maths' count of equal batches);
    a transformer encoder (16 sequences of 32 tokens) with one decay for its embedding."""
    bc, g = H.breast_cancer_data(seed), torch.Generator().manual_seed(seed)
    X, y = H.load_sklearn("digits", torch.float32, torch.long, torch.Generator().manual_seed(seed))
    X, hidden = H.standardize(X, 1000), 2 if quick else 32
    width, rows = (8, 64) if quick else (256, 128)
    Xm = torch.randn(3 * rows, 784, generator=g)
    ym, ce = (Xm @ torch.randn(784, 10, generator=g)).argmax(1), F.cross_entropy
    bce = lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(-1), y)  # noqa: E731
    mlp = lambda i, h, act: lambda: nn.Sequential(nn.Linear(i, h), act(), nn.Linear(h, 10))  # noqa: E731
    tr, va = (bc.train[0].float(), bc.train[1].float()), (bc.val[0].float(), bc.val[1].float())
    digits = ((X[:1000], y[:1000]), (X[1000:], y[1000:]))
    synthetic = ((Xm[:rows], ym[:rows]), (Xm[rows:], ym[rows:]))
    same_size = (Xm[rows : 2 * rows], ym[rows : 2 * rows])  # a val batch of `rows` rows
    (n, tokens, features), size = (4, 4, 4) if quick else (16, 32, 16), (8, 1) if quick else (64, 2)
    Xt = torch.randn(2 * n, tokens, features, generator=g)
    yt = (Xt.mean(1) @ torch.randn(features, 10, generator=g)).argmax(1)
    encoder = lambda: Encoder(features, *size)  # noqa: E731
    return [  # decays: per feature; per hidden unit (its incoming weights); one for layer 1
        ("logreg", (lambda: H.linear_model(bc.dim).float(), tr, va, bce, (1, bc.dim))),
        ("mlp", (mlp(64, hidden, nn.Tanh), *digits, ce, (hidden, 1))),
        ("mnist-mlp", (mlp(784, width, nn.ReLU), *synthetic, ce, (1, 1))),
        ("mnist-mlp", (mlp(784, width, nn.ReLU), synthetic[0], same_size, ce, (1, 1))),
        ("transformer", (encoder, (Xt[:n], yt[:n]), (Xt[n:], yt[n:]), ce, (1, 1))),
    ]


def floors(pb: tuple, lr: float, k: int = 10) -> dict[str, Any]:
    """The maths' floor of a hyper-step in bare ``torch.autograd`` (same model and batches).
    T1T2 (hyperparameters first, as ``T1T2()`` takes a penalty): the training loss at theta_t,
    the validation gradient at theta_{t+1} (given) and the mixed product as the derivative of
    ``grad_decay f`` along it. IFT: the gradient with its graph, the validation gradient, k
    products (Neumann with the inner lr), the product of its residual and the mixed one."""
    model, (xt, yt), (xv, yv), loss, shape = pb
    net = model()
    names, ps = [n for n, _ in net.named_parameters()], [p.detach() for p in net.parameters()]
    decay = torch.full(shape, 1e-2, requires_grad=True)
    call = lambda p, x: torch.func.functional_call(net, dict(zip(names, p)), (x,))  # noqa: E731
    f = lambda p: loss(call(p, xt), yt) + 0.5 * (decay * p[0] ** 2).sum()  # noqa: E731

    def g_grad(p: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        q = [x.detach().requires_grad_() for x in p]
        return torch.autograd.grad(loss(call(q, xv), yv), q)

    p0 = [x.clone().requires_grad_() for x in ps]
    after = [(a - lr * b).detach() for a, b in zip(p0, torch.autograd.grad(f(p0), p0))]

    def t1t2() -> Any:
        p = [x.clone().requires_grad_() for x in ps]
        (gh,) = torch.autograd.grad(f(p), decay, create_graph=True)
        v, u = g_grad(after), torch.zeros_like(gh, requires_grad=True)
        (s,) = torch.autograd.grad((gh * u).sum(), p[0], create_graph=True)
        return torch.autograd.grad((s * v[0]).sum(), u)

    def ift() -> Any:
        p = [x.clone().requires_grad_() for x in ps]
        gf = torch.autograd.grad(f(p), p, create_graph=True)
        v = acc = b = g_grad(p)
        for _ in range(k):
            v = [a - lr * c for a, c in zip(v, torch.autograd.grad(gf, p, v, retain_graph=True))]
            acc = [a + c for a, c in zip(acc, v)]
        x = [lr * a for a in acc]  # the residual ||b - H x|| IFT reports: one more product
        hx = torch.autograd.grad(gf, p, x, retain_graph=True)
        residual = sum(float(((a - c) ** 2).sum()) for a, c in zip(b, hx)) ** 0.5
        return torch.autograd.grad(gf, decay, [-y for y in x]), residual

    return {"T1T2()": t1t2, "IFT() (Neumann, 10 terms)": ift}


def runs(pb: tuple, lr: float) -> list[H.Run]:
    """A bare SGD loop, then one HyperOptimizer run per method (same start, same data)."""
    model, train, val, loss, shape = pb
    torch.manual_seed(0)
    first, decay0 = model(), torch.full(shape, 1e-2)
    penalty = lambda m, d: 0.5 * (d * next(m.parameters()) ** 2).sum()  # noqa: E731
    plain = lambda: loss(first(train[0]), train[1]) + penalty(first, decay0)  # noqa: E731
    out = [H.sgd_run("bare torch.optim.SGD step", first.parameters(), plain, lr)]
    kw = {"outer_optimizer": lambda hp: torch.optim.Adam(hp, lr=0.05), "val_data": val}
    kw |= {"train_loss": lambda m, h, b: loss(m(b[0]), b[1]) + penalty(m, h["decay"])}
    kw |= {"val_loss": lambda m, h, b: loss(m(b[0]), b[1]), "inner_steps": K, "history_size": None}
    for name, (make, _) in METHODS.items():
        m = model()
        m.load_state_dict(first.state_dict())
        hp, sgd = {"decay": hg.Positive(decay0.clone())}, torch.optim.SGD(m.parameters(), lr=lr)
        out.append(H.hopt_run(name, m, hp, train, K, method=make(), inner_optimizer=sgd, **kw))
    raw = torch.zeros(shape, requires_grad=True)  # the user's outer step alone, as the driver
    adam, grad = torch.optim.Adam([raw], lr=0.05), torch.full(shape, 1e-3)  # takes it

    def outer_step() -> None:
        raw.grad = grad.clone()
        adam.step()
        adam.zero_grad(set_to_none=True)

    out.append(H.Run("outer step", outer_step))
    return out + [H.Run(f"floor {n}", fn) for n, fn in floors(pb, lr).items()]


def products(diagnostics: dict[str, Any]) -> float:
    """Every product a hyper-step spent: the solve's and those of its diagnostics (IFT's
    residual ``||b - H x||`` with a fixed-budget Neumann series)."""
    return (diagnostics.get("num_hvps") or 0) + (diagnostics.get("extra_hvps") or 0)


def e2e(r: H.Run, plain: float, steps: int) -> float:
    """The run's wall time over the bare loop's for the same steps: steps without a
    hyper-step at their median, hyper-steps at their mean after the first (which builds
    caches; the mean keeps the occasional dearer one, e.g. a step-size estimate)."""
    hyper, n = r.hyper_s[1:] or r.hyper_s, len(r.hyper_s)
    mean = sum(hyper) / len(hyper) if hyper else 0.0
    return ((steps - n) * H.median(r.step_s) + n * mean) / (steps * plain)


def measure(name: str, pb: tuple, steps: int, lr: float) -> list[dict[str, Any]]:
    H.log(f"[{name}] {len(METHODS)} methods x {steps} steps in lockstep ...")
    rs = runs(pb, lr)
    warned, plain, m, rows = H.lockstep(rs, steps), H.median(rs[0].step_s), pb[4][0] * pb[4][1], []
    floor = {r.label[6:]: H.median(r.step_s) / plain for r in rs if r.label.startswith("floor ")}
    outer = next(H.median(r.step_s) / plain for r in rs if r.label == "outer step")
    for r in (r for r in rs[1:] if "hopt" in r.meta):
        hist = r.meta["hopt"].history
        k = H.median([products(x.diagnostics) for x in hist[1:] or hist])
        cost = H.median([x.seconds for x in hist[1:] or hist]) / plain
        goal = METHODS[r.label][1](int(k) if k == k else 0, m)
        row = {"problem": name, "method": r.label, "hyper_steps": len(hist), "products": k}
        row |= {"cost": cost, "goal": goal, "met": "yes" if cost <= goal else "no"}
        row |= {"e2e": e2e(r, plain, steps), "plain_step_ms": 1e3 * plain, "error": r.error}
        row |= {"hopt_step_ms": 1e3 * H.median(r.step_s), "floor": floor.get(r.label)}
        row |= {"over_floor": cost / floor[r.label] if r.label in floor else None}
        row |= {"train_rows": len(pb[1][0]), "val_rows": len(pb[2][0])}
        full = (H.median(r.hyper_s) - H.median(r.step_s)) / plain if r.hyper_s else None
        row |= {"full_cost": full, "outer": outer}
        rows.append(row | {"hyper_step_ms": 1e3 * H.median([x.seconds for x in hist])})
    return rows + [{"problem": name, "warnings": warned}]


def render(d: dict[str, Any]) -> list[str]:
    s, rows, kinds = d["settings"], [r for r in d["rows"] if "method" in r], {}
    for w in (w for r in d["rows"] for w in r.get("warnings", [])):  # told apart by first words
        tail = re.sub(r"[0-9]+", "#", w.split(" met ")[-1])[:70]
        key = " ".join(w.replace("(", " ").split()[:2]) + " ... " + tail
        kinds[key] = kinds.get(key, 0) + 1
    notes = [
        f"{s['steps']} training steps per run ({s.get('transformer_steps', s['steps'])} for "
        f"the transformer; a hyper-step every {K}), SGD lr {s['lr']}; load average at the "
        f"start {d['machine']['load_average']}",
        "cost = median seconds of a hyper-step (history[i].seconds, the first one left out: "
        "it builds caches) / median bare torch.optim.SGD step; goal: issue 11, goal 5 "
        "(products k = median over the hyper-steps of num_hvps + extra_hvps: every product "
        "spent, IFT's residual ||b - H x|| included; m hyperparameters)",
        "e2e: the run's wall time over the bare loop's: steps without a hyper-step at their "
        "median, hyper-steps at their mean after the first (step-size re-estimates included)",
        "hopt_step_ms: median HyperOptimizer step without a hyper-step (its overhead over the "
        "bare step)",
        "floor: the same hyper-step written by hand in bare torch.autograd (same model and "
        "batches, as in the runs), in training steps; over_floor = cost / floor",
        "train_rows, val_rows: rows of the training batch and of the validation batch; "
        "mnist-mlp runs twice: with its whole validation split (twice the training batch) "
        "and with a validation batch of the training batch's size (the goal's maths counts "
        "equal batches)",
        "full_cost: median HyperOptimizer step with a hyper-step minus median step without "
        "one, in training steps: cost plus the rollback snapshot, the forked random-number "
        "state and the record",
        "outer: the user's outer step alone (torch.optim.Adam over a tensor of the "
        "hyperparameter's shape: gradient written, step, zero_grad), in training steps; it is "
        "part of cost, so floor + outer is the least a hyper-step can cost there",
        *[f"warning ({n} distinct texts): {k}" for k, n in kinds.items()],
    ]
    cols = "problem|val_rows:d|method|hyper_steps:d|products:g|cost:.2f|goal:g|met|floor:.2f"
    cols += "|over_floor:.2f|outer:.2f|full_cost:.2f|e2e:.2f|plain_step_ms:.3f"
    return [H.bullets(notes), H.dict_table(rows, cols + "|hopt_step_ms:.3f|hyper_step_ms:.2f")]


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    rows = []
    for name, pb in problems(args.seed, args.quick):
        steps = args.transformer_steps if name == "transformer" else args.steps
        rows += measure(name, pb, steps, args.lr)
    settings = {"steps": args.steps, "transformer_steps": args.transformer_steps, "lr": args.lr}
    return {"settings": settings, "rows": rows}


OPTIONS = [
    H.option("--steps", 20, 300, type=int, help="training steps per run"),
    H.option("--transformer-steps", 20, 100, type=int, help="the transformer's (~25 ms a step)"),
    H.option("--lr", type=float, default=0.1, help="inner SGD learning rate"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, options=OPTIONS)

if __name__ == "__main__":
    main()
