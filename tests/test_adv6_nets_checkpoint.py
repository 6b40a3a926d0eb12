"""Activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) in the model.

A hyper-step evaluates the losses at its own parameter tensors through ``functional_call``;
a checkpointed segment recomputes its forward pass in the backward pass, after the call has
put the module's own weights (and train/eval flags) back. T1T2 (at the last step's start),
the trajectory methods (every replayed step) and first-order products (at ``theta +- eps
v``) then got gradients of the wrong network, silently: T1T2 with per-example weights was
2.5e-3 off its exact value (the last step's central difference on the same net without
checkpointing), with no warning. A ``val_loss`` that calls ``model.eval()`` had the segment
recomputed in train mode (torch's ``CheckpointError`` on metadata with dropout or
BatchNorm). Both now raise a ``ValueError`` naming the cause, with the step undone; the
implicit methods' double-backward products, at the model's own weights, are right and
still run (checked against the dense float64 implicit formula without checkpointing).
``hg.unrolled`` on a user's ``functional_call`` and ``hg.meta.MAML`` on a module (2.5e-2
off, silently) refuse such losses too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import hypergradient as hg

DT = torch.float64
GEN = torch.Generator().manual_seed(0)


def sample(n):
    x = torch.randn(n, 4, generator=GEN, dtype=DT)
    return x, torch.randint(0, 3, (n,), generator=GEN), torch.arange(n)


BATCHES, VAL = [sample(8) for _ in range(3)], sample(10)


class Net(nn.Module):
    def __init__(self, checkpointed=True, norm=False):
        super().__init__()
        self.checkpointed = checkpointed
        self.first = nn.Linear(4, 6)
        layers = [nn.BatchNorm1d(6)] if norm else []
        self.block = nn.Sequential(*layers, nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        z = self.first(x)
        if self.checkpointed:
            return self.head(checkpoint(self.block, z, use_reentrant=False))
        return self.head(self.block(z))


def make(checkpointed=True, norm=False):
    torch.manual_seed(0)
    return Net(checkpointed, norm).to(DT)


def weights(h, idx):
    return torch.sigmoid(h["w"][idx])


def train_loss(m, h, b):  # per-example weights: the mixed product runs through the block
    ce = nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    return (weights(h, b[2]) * ce).mean() + 0.5 * h["decay"] * sum(
        (p**2).sum() for p in m.parameters()
    )


def val_loss(m, h, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def eval_val_loss(m, h, b):
    m.eval()
    return nn.functional.cross_entropy(m(b[0]), b[1])


def hparams():
    return {"w": torch.zeros(8, dtype=DT), "decay": torch.tensor(1e-2, dtype=DT)}


def hyper_optimizer(model, method, val=val_loss):
    return hg.HyperOptimizer(
        model,
        hparams(),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val,
        val_data=VAL,
        method=method,
        inner_steps=len(BATCHES),
    )


def train(model, hopt, batches):
    for batch in batches:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)


@pytest.mark.parametrize(
    "method",
    [
        hg.T1T2(),
        hg.T1T2(hvp="first_order"),
        hg.Unrolled(),
        hg.ForwardMode(),
        hg.DrMAD(),
        hg.Implicit(hg.Exact(), hvp="first_order"),
    ],
    ids=["t1t2", "t1t2-first-order", "unrolled", "forward", "drmad", "implicit-first-order"],
)
def test_methods_off_the_model_s_weights_refuse_and_undo_the_step(method):
    model = make()
    hopt = hyper_optimizer(model, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, hopt, BATCHES[:-1])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        raw = {k: v.detach().clone() for k, v in hopt.hparams.items()}
        with pytest.raises(ValueError, match="activation checkpointing"):
            train(model, hopt, BATCHES[-1:])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(hopt.hparams[k], raw[k]) for k in raw)
    assert hopt.hyper_steps == 0


def t1t2_exact():
    """T1T2's quantity without checkpointing: the central difference of the validation loss
    with only the last step's hyperparameters moved (along ``u``)."""
    u = {"w": torch.linspace(-1, 1, 8, dtype=DT), "decay": torch.tensor(0.5, dtype=DT)}

    def run(s):
        model = make(checkpointed=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i, batch in enumerate(BATCHES):
            h = {k: v + (s * u[k] if i == len(BATCHES) - 1 else 0) for k, v in hparams().items()}
            opt.zero_grad()
            train_loss(model, h, batch).backward()
            opt.step()
        with torch.no_grad():
            return float(val_loss(model, hparams(), VAL))

    return u, (run(1e-5) - run(-1e-5)) / 2e-5


def test_t1t2_without_checkpointing_is_the_exact_last_step_s_derivative():
    """The reference the refused checkpointed T1T2 missed by 2.5e-3 (relative)."""
    u, fd = t1t2_exact()
    model = make(checkpointed=False)
    hopt = hyper_optimizer(model, hg.T1T2())
    train(model, hopt, BATCHES)
    got = sum(float((hopt.history[-1].hypergrad[k] * u[k]).sum()) for k in u)
    assert abs(got - fd) < 1e-8 * abs(fd) + 1e-12


def dense_implicit(model, h, batch):
    """``d_phi g - M^T H^{-1} grad g`` with dense float64 autograd on the unchecked net."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    keys = list(h)
    phi = torch.cat([h[k].reshape(-1) for k in keys])

    def unflat(vec, like_shapes, like_names):
        out, i = {}, 0
        for n, s in zip(like_names, like_shapes):
            out[n] = vec[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def f(t, p):
        return train_loss(
            _At(model, unflat(t, shapes, names)), unflat(p, [h[k].shape for k in keys], keys), batch
        )

    def g(t):
        return val_loss(_At(model, unflat(t, shapes, names)), None, VAL)

    H = torch.autograd.functional.hessian(lambda t: f(t, phi), theta)
    M = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.jacobian(lambda t: f(t, p), theta, create_graph=True),
        phi,
    )
    gt = torch.autograd.functional.jacobian(g, theta)
    return -(M.T @ torch.linalg.solve(H, gt))


class _At:
    """``model`` called at the parameters ``p`` (a functional call)."""

    def __init__(self, model, p):
        self.model, self.p = model, p

    def __call__(self, x):
        return functional_call(self.model, self.p, (x,))

    def parameters(self):
        return iter(self.p.values())


@pytest.mark.parametrize("val", [val_loss, eval_val_loss], ids=["train-mode", "eval-mode"])
def test_implicit_double_backward_is_still_right_under_checkpointing(val):
    """At the model's own weights the recomputation is right, in either mode of val_loss
    when the segment does not depend on it (no dropout or BatchNorm)."""
    model, reference = make(), make(checkpointed=False)
    hopt = hyper_optimizer(model, hg.Implicit(hg.Exact()), val=val)
    hopt.outer_optimizer.param_groups[0]["lr"] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        train(model, hopt, BATCHES)
    reference.load_state_dict(model.state_dict())
    reference.checkpointed = False
    exact = dense_implicit(reference, hparams(), BATCHES[-1])
    got = torch.cat([hopt.history[-1].hypergrad[k].reshape(-1) for k in ("w", "decay")])
    assert float((got - exact).norm() / exact.norm()) < 1e-9


def test_a_val_loss_switching_to_eval_mode_around_a_checkpoint_raises_clearly():
    model = make(norm=True)
    hopt = hyper_optimizer(model, hg.Implicit(hg.Exact()), val=eval_val_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, hopt, BATCHES[:-1])
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        with pytest.raises(ValueError, match="between train and eval mode"):
            train(model, hopt, BATCHES[-1:])
    # the weights are undone (the running statistics keep the user's own forward pass)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert model.training


def test_functional_unrolled_refuses_a_checkpointed_functional_call():
    model = make()
    p0 = {k: v.detach() for k, v in model.named_parameters()}

    def inner(p, h):
        return train_loss(_At(model, p), h, BATCHES[0])

    def outer(p, h):
        return val_loss(_At(model, p), h, VAL)

    with pytest.raises(ValueError, match="of the trajectory"):
        hg.unrolled(inner, outer, p0, hparams(), 2, hg.optim.sgd(lr=0.1))


def test_maml_refuses_a_checkpointed_module():
    model = make()
    theta = hg.meta.parameters_of(model, copy=True)
    x, y = BATCHES[0][0], BATCHES[0][1]
    maml = hg.meta.MAML(model, inner_steps=2, inner_lr=0.1, criterion=nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="activation checkpointing"):
        maml.step(theta, [((x, y), (x, y))])


def test_functional_implicit_first_order_refuses_a_checkpointed_functional_call():
    """``hg.implicit(hvp="first_order")`` differences gradients at ``theta +- h v``, where the
    recomputation uses the module's own weights: refused, where double backward at the
    module's own weights is the dense formula's."""
    model = make()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def inner(p, h):
        return train_loss(_At(model, p), h, BATCHES[0])

    def outer(p, h):
        return val_loss(_At(model, p), h, VAL)

    with pytest.raises(ValueError, match="first-order products"):
        hg.implicit(inner, outer, params, hparams(), solver=hg.Exact(), hvp="first_order")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        got = hg.implicit(inner, outer, params, hparams(), solver=hg.Exact())
    reference = make(checkpointed=False)
    exact = dense_implicit(reference, hparams(), BATCHES[0])
    flat = torch.cat([got[k].reshape(-1) for k in ("w", "decay")])
    assert float((flat - exact).norm() / exact.norm()) < 1e-9
