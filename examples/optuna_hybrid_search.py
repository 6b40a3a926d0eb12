"""Hybrid search: Optuna picks the structure and the starting decays, hypergradients refine.

The problem
-----------
A tanh MLP on scikit-learn's digits (1,797 8x8 images; 500 train, 400 validation, the rest
test) with one L2 decay per layer. The choices: the hidden width (16, 32 or 64, no
gradient) and the two decays (continuous), tuned to minimize the validation loss.

Every trial is the same training (SGD with momentum, ``--epochs`` passes over the training
set in batches of 50, from the same initialization):

* **TPE alone**: each Optuna trial samples the width and both decays and trains at them.
* **hypergradient alone**: one such training at width 32 from ``lambda = 1e-3``, whose
  decays a ``hg.HyperOptimizer`` refines while the model trains (an implicit hypergradient
  every 5 steps, Adam on ``log lambda``): one trial's worth of compute.
* **hybrid**: each Optuna trial samples the width, one *starting* decay and the outer
  learning rate, then the ``HyperOptimizer`` refines both decays inside the trial through
  :func:`hypergradient.integrations.optuna.refine` (the validation loss reported after
  every epoch: Optuna's ``MedianPruner`` stops hopeless trials; the refined decays are
  stored on the trial and read back with ``refined_hparams``).

A trial's value is its best validation loss after an epoch, its test loss that of its
model at the end. The wall time of each search is printed.

What to expect
--------------
With the defaults (seed 0; 10 trials of 8 epochs, one thread) the table reads::

    search                  best val     test  trials
    TPE alone                 0.1466   0.1921      10
    hybrid (TPE + HG)         0.1567   0.1912      10
    hypergradient alone       0.1546   0.1748       1

Read it honestly: eight epochs leave the network far from converged, so the decays matter
little next to the width and the training's own noise; TPE's ten plain trials found the
lowest validation loss, the hybrid's refinement did not beat it (three of its ten trials
were pruned; its best is its first trial, the hypergradient start), and the single
hypergradient run, a tenth of the compute, has the lowest test loss. The hybrid pays
where each trial trains close to convergence and the continuous hyperparameters are many
(``benchmarks/hybrid_optuna.py`` measures it); this script shows the mechanics: the
objective, ``refine``, pruning, and reading the refined decays back.

Run it
------
    .venv/bin/python examples/optuna_hybrid_search.py            # ~1 min
    .venv/bin/python examples/optuna_hybrid_search.py --quick    # smoke run, seconds

Requires optuna and scikit-learn: ``pip install -e ".[examples,integrations]"``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hypergradient as hg
from hypergradient.integrations.optuna import refine, refined_hparams

LAYERS = ("0.weight", "2.weight")


def load(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = {"train": perm[:500], "val": perm[500:900], "test": perm[900:]}
    return {k: (X[i], y[i]) for k, i in parts.items()}


def mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
    )


def penalty(model: torch.nn.Module, decays: dict[str, torch.Tensor]) -> torch.Tensor:
    named = dict(model.named_parameters())
    return sum(0.5 * decays[n] * (named[n] ** 2).sum() for n in LAYERS)


def loss(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data[0]), data[1]))


class Searches:
    """The data, the training loop, and the three searches."""

    def __init__(self, data: dict, epochs: int, seed: int):
        self.data, self.epochs, self.seed = data, epochs, seed
        train = torch.utils.data.TensorDataset(*data["train"])
        gen = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(train, batch_size=50, shuffle=True, generator=gen)

    def inner(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    def hopt(
        self, width: int, lam0: float, outer_lr: float
    ) -> tuple[torch.nn.Module, hg.HyperOptimizer]:
        model = mlp(width)
        decays = {n: hg.Positive(torch.tensor(lam0)) for n in LAYERS}
        return model, hg.HyperOptimizer(
            model,
            decays,
            inner_optimizer=self.inner(model),
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=outer_lr),
            train_loss=lambda m, h, b: F.cross_entropy(m(b[0]), b[1]) + penalty(m, h),
            val_loss=lambda m, h, b: F.cross_entropy(m(b[0]), b[1]),
            val_data=self.data["val"],
            val_batch_size=200,
            method=hg.IFT(hg.CG(maxiter=10), damping=1.0),
            inner_steps=5,
            seed=self.seed,
        )

    def tpe_objective(self, trial: optuna.Trial) -> float:
        model = mlp(trial.suggest_categorical("width", [16, 32, 64]))
        decays = {n: torch.tensor(trial.suggest_float(n, 1e-5, 1e-1, log=True)) for n in LAYERS}
        opt, best = self.inner(model), math.inf
        for _ in range(self.epochs):
            for x, y in self.loader:
                opt.zero_grad()
                (F.cross_entropy(model(x), y) + penalty(model, decays)).backward()
                opt.step()
            best = min(best, loss(model, self.data["val"]))
        trial.set_user_attr("test_loss", loss(model, self.data["test"]))
        return best

    def hybrid_objective(self, trial: optuna.Trial) -> float:
        width = trial.suggest_categorical("width", [16, 32, 64])
        lam0 = trial.suggest_float("lam0", 1e-5, 1e-1, log=True)
        outer_lr = trial.suggest_float("outer_lr", 0.03, 0.3, log=True)
        model, hopt = self.hopt(width, lam0, outer_lr)
        try:
            return refine(
                trial,
                hopt,
                self.loader,
                epochs=self.epochs,
                score=lambda: loss(model, self.data["val"]),
            )
        finally:
            trial.set_user_attr("test_loss", loss(model, self.data["test"]))

    def hypergradient_alone(self) -> tuple[list[float], float, dict]:
        """Validation loss after every epoch, the final test loss and decays."""
        model, hopt = self.hopt(32, 1e-3, 0.1)
        curve = []
        for _ in range(self.epochs):
            for batch in self.loader:
                hopt.zero_grad()
                hopt.train_loss(batch).backward()
                hopt.step(batch)
            curve.append(loss(model, self.data["val"]))
        return curve, loss(model, self.data["test"]), hopt.hparams

    def study(self, objective, trials: int, pruner: optuna.pruners.BasePruner) -> optuna.Study:
        sampler = optuna.samplers.TPESampler(seed=self.seed, multivariate=True)
        study = optuna.create_study(sampler=sampler, pruner=pruner)
        study.optimize(objective, n_trials=trials)
        return study


def best_so_far(study: optuna.Study) -> list[float]:
    out, best = [], math.inf
    for t in study.trials:
        if t.value is not None:
            best = min(best, t.value)
        out.append(best)
    return out


def plot(tpe: optuna.Study, hybrid: optuna.Study, curve: list[float], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(tpe.trials)
    ax.step(range(1, n + 1), best_so_far(tpe), where="post", label="TPE alone", color="tab:blue")
    ax.step(
        range(1, n + 1),
        best_so_far(hybrid),
        where="post",
        label="hybrid (TPE + HG)",
        color="tab:red",
    )
    ax.axhline(min(curve), color="tab:green", ls="--", label="hypergradient alone (1 trial)")
    ax.set(xlabel="trials", ylabel="best validation loss so far")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Digits MLP, width and two layer decays")
    fig.tight_layout()
    path = out / "optuna_hybrid_search.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=8, help="epochs per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("."), help="folder of the plot")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 trials of 1 epoch")
    args = p.parse_args()
    if args.quick:
        args.trials, args.epochs = 3, 1
        print("quick mode: a smoke run of a few seconds; its figures are not the documented ones.")
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=hg.HypergradientWarning)
    s = Searches(load(args.seed), args.epochs, args.seed)
    seconds, started = {}, time.perf_counter()
    tpe = s.study(s.tpe_objective, args.trials, optuna.pruners.NopPruner())
    seconds["tpe"], started = time.perf_counter() - started, time.perf_counter()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    hybrid = s.study(s.hybrid_objective, args.trials, pruner)
    seconds["hybrid"], started = time.perf_counter() - started, time.perf_counter()
    curve, hg_test, hg_decays = s.hypergradient_alone()
    seconds["hg"] = time.perf_counter() - started
    print(f"{'search':<22} {'best val':>9} {'test':>8} {'trials':>7} {'seconds':>8}")
    for key, name, st in (("tpe", "TPE alone", tpe), ("hybrid", "hybrid (TPE + HG)", hybrid)):
        b = st.best_trial
        print(
            f"{name:<22} {b.value:9.4f} {b.user_attrs['test_loss']:8.4f} "
            f"{len(st.trials):7d} {seconds[key]:8.1f}"
        )
    print(
        f"{'hypergradient alone':<22} {min(curve):9.4f} {hg_test:8.4f} {1:7d} {seconds['hg']:8.1f}"
    )
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in hybrid.trials)
    b = hybrid.best_trial
    refined = {k: float(v) for k, v in refined_hparams(b).items()}
    print(
        f"hybrid: {pruned} of {len(hybrid.trials)} trials pruned; best trial {b.number}: {b.params}"
    )
    print("  its refined decays: " + ", ".join(f"{k} {v:.3g}" for k, v in refined.items()))
    tpe_best = tpe.best_params
    print("TPE alone's best: " + ", ".join(f"{k} {tpe_best[k]:.3g}" for k in LAYERS), end="")
    print(f", width {tpe_best['width']}")
    decays = ", ".join(f"{k} {float(v):.3g}" for k, v in hg_decays.items())
    print(f"hypergradient alone's decays: {decays}")
    print("plot:", plot(tpe, hybrid, curve, args.out))


if __name__ == "__main__":
    main()
