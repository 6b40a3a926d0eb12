"""Per-layer weight decay and label smoothing of a small transformer, first-order products.

The problem
-----------
Sequence classification on scikit-learn's bundled 8x8 digits (1,797 real images; no
download): each image is read as a sequence of 8 rows, each row an 8-dimensional token, and
a one-layer transformer (token projection + learned positions, one
``nn.TransformerEncoderLayer`` with 4 heads, mean pooling, linear head; no dropout) predicts
the digit. The training set is small (300 sequences), so the model overfits it. Five
hyperparameters: one weight decay per layer group (token embedding and positions, attention,
feed-forward, head; ``lambda_k = exp(phi_k)``) and the label smoothing ``eps`` of the
training loss (in ``[0, 0.3]``):

    f(theta, phi) = (1 - eps) CE(train) + eps * mean_c(-log p_c) + 1/2 sum_k lambda_k ||W_k||^2
    g(theta)      = CE(validation)                               (no smoothing, no decay)

``hg.HyperOptimizer`` with ``hg.Unrolled(hvp="first_order")`` differentiates ``g`` through
the last 10 Adam steps of the real training run (the window) every 10 steps. The attention
of ``nn.TransformerEncoderLayer`` runs the fused CPU kernel, which has no double backward;
the first-order mode gets the reverse steps' second-order products from central
differences of gradients, ``(grad f(theta + h v) - grad f(theta - h v)) / 2h``, which work
with any kernel, keep no double-backward graph, and cost two gradients per step (relative
error ~1e-9 in float64, ``docs/guide/modes.md``). The model runs in float64: in float32
the difference's step crosses the kinks of the feed-forward block's ReLU and the products
lose their accuracy (measured there). ``hvp="auto"`` would instead fall back to the math
attention kernel with one warning.

What the script does
--------------------
1. Stratified, seeded split: 300 train / 300 validation / 1,197 test sequences.
2. Baselines from the same initialization and the same number of Adam steps: untuned
   (decay 1e-4 everywhere, no smoothing) and a grid over one global decay x smoothing,
   chosen by validation loss.
3. Per-layer decays and smoothing tuned along one training run, started untuned.
4. A results table and a PNG: validation and test loss along the hyper-steps against the
   baselines, and the hyperparameters' paths.

Run it
------
    .venv/bin/python examples/transformer_text.py            # full run (~2 CPU minutes)
    .venv/bin/python examples/transformer_text.py --quick    # smoke test (a few seconds)

Full-run figures and their reading: ``docs/tutorials/transformer.md``. Requires the
examples extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import hypergradient as hg  # noqa: E402

Split = tuple[Tensor, Tensor]
DT = torch.float64  # a tiny model: float64 costs little and the replay is exact to 1e-13
GROUPS = {  # layer group -> parameter names (biases and LayerNorms are not penalized)
    "embedding": ("embed.weight", "pos"),
    "attention": ("encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj.weight"),
    "feedforward": ("encoder.linear1.weight", "encoder.linear2.weight"),
    "head": ("head.weight",),
}


def load_splits(seed: int, n_train: int, n_val: int) -> dict[str, Split]:
    """Digits as sequences of 8 rows of 8 pixels, standardized with training statistics."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_rest, y_tr, y_rest = train_test_split(
        X, y, train_size=n_train, stratify=y, random_state=seed
    )
    X_va, X_te, y_va, y_te = train_test_split(
        X_rest, y_rest, train_size=n_val, stratify=y_rest, random_state=seed + 1
    )
    mean, std = X_tr.mean(), X_tr.std()
    out = {}
    for name, (a, b) in {"train": (X_tr, y_tr), "val": (X_va, y_va), "test": (X_te, y_te)}.items():
        seq = torch.tensor((a - mean) / std, dtype=DT).reshape(-1, 8, 8)
        out[name] = (seq, torch.tensor(b))
    return out


class DigitTransformer(nn.Module):
    """Row tokens -> linear projection + positions -> one encoder layer -> mean -> head."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d))
        self.encoder = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def make_model(seed: int) -> DigitTransformer:
    torch.manual_seed(seed)  # every model starts from the same initialization
    return DigitTransformer().to(DT)


def penalty(model: nn.Module, decay: dict[str, Tensor]) -> Tensor:
    params = dict(model.named_parameters())
    return 0.5 * sum(decay[g] * sum((params[n] ** 2).sum() for n in GROUPS[g]) for g in GROUPS)


def smoothed_ce(logits: Tensor, y: Tensor, eps: Tensor | float) -> Tensor:
    """``(1 - eps) CE + eps * mean over classes of -log p``: differentiable in ``eps``."""
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, y[:, None]).mean()
    return (1 - eps) * nll + eps * (-logp.mean(1)).mean()


def train_loss(model: nn.Module, h: dict[str, Tensor], batch: Split) -> Tensor:
    x, y = batch
    return smoothed_ce(model(x), y, h["smoothing"]) + penalty(model, h)


def val_loss(model: nn.Module, h: dict[str, Tensor], batch: Split) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def evaluate(model: nn.Module, splits: dict[str, Split]) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for name, (x, y) in splits.items():
            logits = model(x)
            out[f"{name}_loss"] = float(F.cross_entropy(logits, y))
            out[f"{name}_acc"] = float((logits.argmax(1) == y).float().mean())
    return out


def batches(train: Split, steps: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, train[0].shape[0], (size,), generator=g)
        yield train[0][idx], train[1][idx]


def train_fixed(h: dict[str, Tensor], splits, args) -> DigitTransformer:
    model = make_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for batch in batches(splits["train"], args.steps, args.batch, args.seed):
        opt.zero_grad()
        train_loss(model, h, batch).backward()
        opt.step()
    return model


def fixed(decay: float, smoothing: float) -> dict[str, Tensor]:
    out = {g: torch.tensor(decay, dtype=DT) for g in GROUPS}
    out["smoothing"] = torch.tensor(smoothing, dtype=DT)
    return out


def tune(splits, args, start: dict[str, Tensor]):
    """One training run; a first-order unrolled hyper-step every ``inner_steps`` steps."""
    model = make_model(args.seed)
    hparams = {g: hg.Positive(start[g].clone()) for g in GROUPS}
    hparams["smoothing"] = hg.Interval(start["smoothing"].clamp(min=0.01), 0.0, 0.3)
    hopt = hg.HyperOptimizer(
        model,
        hparams,
        history_size=None,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=args.outer_lr),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=splits["val"],
        method=hg.Unrolled(hvp="first_order"),
        inner_steps=args.inner_steps,
        seed=args.seed,
    )
    curve: dict[str, list[float]] = {"step": [], "val": [], "test": []}
    paths: dict[str, list[float]] = {k: [] for k in hparams}
    for t, batch in enumerate(batches(splits["train"], args.steps, args.batch, args.seed)):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        before = hopt.hyper_steps
        hopt.step(batch)
        if hopt.hyper_steps > before:
            m = evaluate(model, {"val": splits["val"], "test": splits["test"]})
            curve["step"].append(t + 1)
            curve["val"].append(m["val_loss"])
            curve["test"].append(m["test_loss"])
            for k, v in hopt.hparams.items():
                paths[k].append(float(v))
    return model, hopt, curve, paths


def plot(path: Path, curve, paths, rows) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ax = axes[0]
    ax.plot(curve["step"], curve["val"], color="C0", label="tuned run: validation")
    ax.plot(curve["step"], curve["test"], color="C3", label="tuned run: test")
    for (name, _, m, _), style in zip(rows[:2], (":", "--")):
        ax.axhline(m["val_loss"], color="C0", ls=style, lw=1, label=f"{name}: val")
        ax.axhline(m["test_loss"], color="C3", ls=style, lw=1, label=f"{name}: test")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Transformer on digit rows: per-layer decays + smoothing")
    ax.legend(fontsize=7)
    ax = axes[1]
    for k, v in paths.items():
        if k != "smoothing":
            ax.plot(curve["step"], np.log10(v), label=f"log10 decay: {k}")
    ax.set_xlabel("training step")
    ax.set_ylabel("log10 weight decay")
    ax.set_title("hyperparameters (Unrolled, first-order products)")
    ax.legend(fontsize=7, loc="lower left")
    right = ax.twinx()
    right.plot(curve["step"], paths["smoothing"], "k--", label="label smoothing (right)")
    right.set_ylabel("label smoothing")
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows) -> None:
    head = ("method", "hparams", "val loss", "val acc", "test loss", "test acc", "time (s)")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for name, n, m, sec in rows:
        cells = [name, str(n)]
        for split in ("val", "test"):
            cells += [f"{m[f'{split}_loss']:.4f}", f"{m[f'{split}_acc']:.3f}"]
        print("| " + " | ".join([*cells, f"{sec:.1f}"]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (a few seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "output", help="PNG dir"
    )
    parser.add_argument("--steps", type=int, default=800, help="Adam steps of every model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner Adam learning rate")
    parser.add_argument("--inner-steps", type=int, default=10, help="steps per hyper-step")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam lr (raw hparams)")
    args = parser.parse_args()
    decays, smoothings = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], [0.0, 0.1]
    if args.quick:
        args.steps, decays, smoothings = 40, [1e-4, 1e-2], [0.0]
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    splits = load_splits(args.seed, 300, 300)
    print(
        "sklearn digits as 8-token sequences: "
        + ", ".join(f"{k} {v[0].shape[0]}" for k, v in splits.items())
        + f"; {args.steps} Adam steps (lr {args.lr}, batch {args.batch}) per model"
    )
    rows = []
    t0 = time.perf_counter()
    untuned = fixed(1e-4, 0.0)
    rows.append(
        (
            "untuned (decay 1e-4, eps 0)",
            0,
            evaluate(train_fixed(untuned, splits, args), splits),
            time.perf_counter() - t0,
        )
    )
    t0 = time.perf_counter()
    grid = [
        (d, s, evaluate(train_fixed(fixed(d, s), splits, args), splits))
        for d in decays
        for s in smoothings
    ]
    d, s, best = min(grid, key=lambda r: r[2]["val_loss"])
    name = f"grid ({len(grid)} runs): decay {d:.0e}, eps {s:g}"
    rows.append((name, 2, best, time.perf_counter() - t0))
    t0 = time.perf_counter()
    model, hopt, curve, paths = tune(splits, args, untuned)
    tuned = evaluate(model, splits)
    rows.append(("tuned: 4 layer decays + eps (1 run)", 5, tuned, time.perf_counter() - t0))
    modes = {r.diagnostics.get("hvp") for r in hopt.history}
    print(f"{hopt.hyper_steps} hyper-steps, product mode {sorted(map(str, modes))}; learned:")
    print("  " + ", ".join(f"{k} {float(v):.3g}" for k, v in hopt.hparams.items()) + "\n")
    print_table(rows)
    path = args.out / "transformer_text.png"
    plot(path, curve, paths, rows)
    print(f"\nplot: {path}\ntotal wall time: {time.perf_counter() - started:.1f} s")
    if args.quick:
        print(
            "\nquick mode: a smoke run on a reduced problem that checks the script runs; its "
            "figures are not the documented results (docs/tutorials/transformer.md)"
        )
    assert all(math.isfinite(v) for m in (tuned, best) for v in m.values())


if __name__ == "__main__":
    main()
