"""A parameter with requires_grad=False inside the inner optimizer is treated as trained.

`optim.SGD(model.parameters())` with a frozen part (the usual fine-tuning idiom; Lightning's
`configure_optimizers` often does it): torch's optimizer never moves the frozen bias (its
.grad stays None), but ModelView counts every tensor of the optimizer's param groups as
trained (`hyperoptimizer/model.py`, `trained_tensors` / `ModelView.__init__`), so the Unrolled
replay moves the bias and ends 0.40 (relative) away from the real weights, with a warning
that blames the user's train_loss. Implicit methods differentiate through the bias too.
Expected: replay_error ~ 1e-16 (the same run with the bias left out of the optimizer gives
0.0). Fix belongs in hyperoptimizer/model.py (skip tensors with requires_grad=False).
The Lightning callback works around it (integrations/_lightning_checks.trained_view); plain
HyperOptimizer users and the Optuna `refine` path still meet it."""

import warnings

import torch

import hypergradient as hg

DT = torch.float64


def run(frozen_in_optimizer):
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=DT), torch.randn(64, dtype=DT)
    model = torch.nn.Linear(5, 1).double()
    model.bias.requires_grad_(False)
    params = model.parameters() if frozen_in_optimizer else [model.weight]
    opt = torch.optim.SGD(params, lr=0.5)
    decay = hg.Positive(torch.full((5,), 1e-2, dtype=DT))

    def fit(m, h, b):
        return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=opt,
        outer_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
        train_loss=lambda m, h, b: fit(m, h, b) + 0.5 * (h["decay"] * m.weight[0] ** 2).sum(),
        val_loss=fit,
        val_data=(x, y),
        method=hg.Unrolled(),
        inner_steps=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(3):
            b = (x[16 * i : 16 * i + 16], y[16 * i : 16 * i + 16])
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    return hopt.history[-1].info.replay_error


print("bias left out of the optimizer: replay_error", run(False))  # 0.0
print("frozen bias in the optimizer:   replay_error", run(True))  # 0.40 (bug)
