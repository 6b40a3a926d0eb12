"""The meta-training loop of the README, ``parameters_of``, validation and diagnostics of ``meta``.

- The README loop (``theta = hg.meta.parameters_of(model)``, a torch optimizer on
  ``theta.values()``, ``.grad = meta-gradient``, ``opt.step()``) trains the module itself,
  step for step as a hand-written second-order MAML with autograd and torch's Adam;
  ``parameters_of(model, copy=True)`` is an independent snapshot.
- Arguments go through ``_vocab``: numpy scalars give the same results as Python numbers,
  ``bool`` is refused where a number is meant.
- ``MetaInfo`` is an ``hg.Info``; non-finite values raise ``NonFiniteHypergradientError``
  naming the first non-finite quantity.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient import meta
from hypergradient._vocab import ArgumentTypeError, Status

DT = torch.float64
GEN = torch.Generator().manual_seed(11)


def sine_task(k: int = 6):
    amp = 0.5 + torch.rand((), generator=GEN, dtype=DT)
    x = 4 * torch.rand(2 * k, 1, generator=GEN, dtype=DT) - 2
    y = amp * torch.sin(x + 0.3)
    return (x[:k], y[:k]), (x[k:], y[k:])


META_BATCHES = [[sine_task() for _ in range(2)] for _ in range(3)]


def make_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def maml_by_hand(model, theta, task, steps, lr):
    """Second-order MAML with autograd: the steps kept in the graph, backprop to theta."""

    def loss(p, batch):
        return ((functional_call(model, p, (batch[0],)) - batch[1]) ** 2).mean()

    t = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    p = t
    for _ in range(steps):
        g = torch.autograd.grad(loss(p, task[0]), list(p.values()), create_graph=True)
        p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
    return dict(zip(t, torch.autograd.grad(loss(p, task[1]), list(t.values()))))


# ----------------------------------------------------------------------------- README loop


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_readme_loop_trains_the_model_itself(vectorize):
    model = make_model()
    reference_model = copy.deepcopy(model)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}

    # The README's loop, as written.
    theta = hg.meta.parameters_of(model)  # dict of leaf tensors
    opt = torch.optim.Adam(theta.values(), lr=1e-2)
    maml = hg.meta.MAML(model, inner_steps=2, inner_lr=0.05, vectorize=vectorize)
    for tasks in META_BATCHES:  # [((x_s, y_s), (x_q, y_q)), ...]
        grad, info = maml.step(theta, tasks)
        for k in theta:
            theta[k].grad = grad[k]
        opt.step()

    # The same loop by hand: autograd MAML and torch's Adam on an independent copy.
    ref = {k: v.detach().clone() for k, v in reference_model.named_parameters()}
    ref_opt = torch.optim.Adam(ref.values(), lr=1e-2)
    for tasks in META_BATCHES:
        grads = [maml_by_hand(reference_model, ref, t, 2, 0.05) for t in tasks]
        for k in ref:
            ref[k].grad = (grads[0][k] + grads[1][k]) / 2
        ref_opt.step()

    for k, v in model.named_parameters():
        assert torch.allclose(v.detach(), ref[k], rtol=1e-10, atol=1e-13), k
        assert (v.detach() - initial[k]).abs().max() > 1e-3  # it moved: the model was trained
    assert all(not v.requires_grad for v in theta.values())


def test_parameters_of_aliases_the_module_and_copy_true_is_a_snapshot():
    model = make_model()
    live, snap = meta.parameters_of(model), meta.parameters_of(model, copy=True)
    for k, p in model.named_parameters():
        assert live[k].data_ptr() == p.data_ptr() and not live[k].requires_grad
        assert snap[k].data_ptr() != p.data_ptr() and torch.equal(snap[k], p.detach())
    before = {k: v.clone() for k, v in snap.items()}
    opt = torch.optim.SGD(snap.values(), lr=0.1)  # training the copy leaves the model alone
    for v in snap.values():
        v.grad = torch.ones_like(v)
    opt.step()
    assert all(torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())
    with torch.no_grad():  # and training the model leaves the copy alone
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(live[k], p.detach()) for k, p in model.named_parameters())
    assert all(torch.equal(snap[k], before[k] - 0.1) for k in snap)


# ----------------------------------------------------------------------------- validation


def lsq(params, batch):
    x, y = batch
    return 0.5 * ((x @ params["w"] - y) ** 2).mean()


THETA = {"w": torch.tensor([0.3, -0.2], dtype=DT)}
LSQ_TASKS = [
    ((torch.randn(5, 2, generator=GEN, dtype=DT), torch.randn(5, generator=GEN, dtype=DT)),) * 2
    for _ in range(2)
]


def test_numpy_scalars_give_the_same_meta_gradients_as_python_numbers():
    lr = np.float32(0.1)
    a, _ = meta.MAML(lsq, inner_steps=np.int64(2), inner_lr=lr).step(THETA, LSQ_TASKS)
    b, _ = meta.MAML(lsq, inner_steps=2, inner_lr=float(lr)).step(THETA, LSQ_TASKS)
    assert torch.equal(a["w"], b["w"])
    kw = dict(inner_steps=np.int32(3), inner_lr=np.float64(0.1), solver=hg.Exact())
    c, _ = meta.IMAML(lsq, lam=np.float64(0.5), damping=np.float32(0.25), **kw).step(
        THETA, LSQ_TASKS
    )
    kw = dict(inner_steps=3, inner_lr=0.1, solver=hg.Exact())
    d, _ = meta.IMAML(lsq, lam=0.5, damping=float(np.float32(0.25)), **kw).step(THETA, LSQ_TASKS)
    assert torch.equal(c["w"], d["w"])
    phi = meta.adapt(lsq, THETA, LSQ_TASKS[0][0], steps=np.int64(2), lr=np.float64(0.1), lam=0.5)
    assert phi["w"].shape == (2,)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: meta.MAML(lsq, inner_steps=True, inner_lr=0.1), "inner_steps"),
        (lambda: meta.MAML(lsq, inner_steps=1, inner_lr=True), "inner_lr"),
        (lambda: meta.MAML(lsq, inner_steps=1, inner_lr=0.1, checkpoint_every=True), "checkpoint"),
        (lambda: meta.MAML(lsq, inner_steps=1, inner_lr=0.1, vectorize=1), "vectorize"),
        (lambda: meta.MAML(lsq, inner_steps=1, inner_lr=0.1, first_order="no"), "first_order"),
        (lambda: meta.IMAML(lsq, lam=True, inner_steps=1, inner_lr=0.1), "lam"),
        (lambda: meta.IMAML(lsq, lam=1.0, inner_steps=1, inner_lr=0.1, damping=False), "damping"),
        (lambda: meta.adapt(lsq, THETA, LSQ_TASKS[0][0], steps=True, lr=0.1), "steps"),
        (lambda: meta.adapt(lsq, THETA, LSQ_TASKS[0][0], steps=1, lr=0.1, lam=True), "lam"),
        (lambda: meta.parameters_of(make_model(), copy=1), "copy"),
        (lambda: meta.parameters_of(lsq), "model"),
        (lambda: meta.module_loss(make_model(), criterion=3), "criterion"),
        (lambda: meta.MAML(lsq, inner_steps=1, inner_lr=0.1, criterion=lsq), "criterion"),
        (lambda: meta.MAML(3, inner_steps=1, inner_lr=0.1), "model_or_loss"),
    ],
)
def test_wrong_types_raise_argument_type_error_naming_the_argument(build, name):
    with pytest.raises(ArgumentTypeError, match=f"`{name}"):
        build()


def test_values_out_of_range_raise_value_error():
    for build, name in [
        (lambda: meta.MAML(lsq, inner_steps=1, inner_lr=0.1, checkpoint_every=0), "checkpoint"),
        (lambda: meta.IMAML(lsq, lam=float("inf"), inner_steps=1, inner_lr=0.1), "lam"),
        (lambda: meta.IMAML(lsq, lam=1.0, inner_steps=1, inner_lr=float("nan")), "inner_lr"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}") as caught:
            build()
        assert not isinstance(caught.value, TypeError)


# ----------------------------------------------------------------------------- diagnostics


def test_meta_info_is_an_info_with_status_and_outer_loss():
    _, info = meta.maml_step(lsq, THETA, LSQ_TASKS, inner_steps=2, inner_lr=0.1)
    assert isinstance(info, hg.Info) and info.method == "maml"
    assert info.outer_loss == pytest.approx(info.query_loss, rel=1e-15)
    assert info.status is Status.FIXED_BUDGET and info.status.ok
    plain = info.as_dict()
    assert plain["method"] == "maml" and plain["status"] == "fixed_budget" and "tasks" not in plain
    cg = hg.CG(maxiter=20, tol=1e-12)
    _, info = meta.imaml_step(
        lsq, THETA, LSQ_TASKS, lam=1.0, inner_steps=50, inner_lr=0.2, solver=cg
    )
    assert info.status is Status.CONVERGED and info.converged and info.num_hvps > 0
    assert info.num_hvps == sum(t.num_hvps for t in info.tasks)  # one solve per task


def test_an_indefinite_system_shows_in_the_meta_info_status():
    def concave(params, batch):
        return -lsq(params, batch)

    im = meta.IMAML(concave, lam=1e-3, inner_steps=1, inner_lr=1e-3, solver=hg.CG(maxiter=10))
    with pytest.warns(hg.HypergradientWarning):
        _, info = im.step(THETA, LSQ_TASKS)
    assert info.status is Status.NEGATIVE_CURVATURE and not info.status.ok
    assert info.converged is False


# ----------------------------------------------------------------------------- non-finite


def with_nan(task, where: int):
    (xs, ys), (xq, yq) = task
    bad = xs.clone() if where == 0 else xq.clone()
    bad[0, 0] = float("nan")
    return ((bad, ys), (xq, yq)) if where == 0 else ((xs, ys), (bad, yq))


LEARNERS = {
    "maml": lambda v: meta.MAML(lsq, inner_steps=2, inner_lr=0.1, vectorize=v),
    "fomaml": lambda v: meta.MAML(lsq, inner_steps=2, inner_lr=0.1, first_order=True, vectorize=v),
    "imaml": lambda v: meta.IMAML(lsq, lam=1.0, inner_steps=2, inner_lr=0.1, vectorize=v),
}


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_a_nan_support_batch_is_named(name, vectorize):
    tasks = [LSQ_TASKS[0], with_nan(LSQ_TASKS[1], 0)]
    with pytest.raises(hg.NonFiniteHypergradientError, match=r"tasks\[1\]") as caught:
        LEARNERS[name](vectorize).step(THETA, tasks)
    assert caught.value.quantity == "the support loss at meta_params of tasks[1]"


@pytest.mark.parametrize("name", ["fomaml", "imaml"])
def test_a_diverging_adaptation_is_named(name):
    learner = LEARNERS[name](False)
    learner.inner_optimizer = hg.optim.sgd(lr=1e4)
    learner.inner_steps = 80
    with pytest.raises(hg.NonFiniteHypergradientError, match="diverged") as caught:
        learner.step(THETA, LSQ_TASKS)
    assert caught.value.quantity == "The adapted value of meta_params['w']"


def test_a_nan_query_batch_is_named_by_first_order_maml():
    tasks = [with_nan(LSQ_TASKS[0], 1)]
    with pytest.raises(hg.NonFiniteHypergradientError, match="query loss") as caught:
        LEARNERS["fomaml"](True).step(THETA, tasks)
    assert "adapted meta_params['w']" in caught.value.quantity
