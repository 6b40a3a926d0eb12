"""Adversarial review of ``hg.meta`` on ordinary modules and grad modes.

Each test failed on the code before the review:

- A ``BatchNorm`` in training mode: every meta-gradient call updated the module's running
  statistics (inner steps, their replay and the diagnostics: 8 updates per task for 2 steps
  of MAML), and ``vectorize=True`` crashed (torch refuses in-place updates under ``vmap``).
  Now the buffers are left alone and the meta-gradients equal a hand-unrolled float64
  autograd computation in both paths.
- Dropout with ``vectorize=True`` crashed (``vmap`` refuses random ops by default); each
  task now draws its own masks, and the meta-gradient equals the hand-unrolled computation
  drawing the same masks.
- ``parameters_of`` returned frozen parameters (``requires_grad=False``): the inner loop
  adapted them and the documented outer loop trained them.
- Under ``torch.inference_mode()`` every meta-gradient and ``adapt`` silently came out
  wrong (autograd records nothing: zero gradients); iMAML under ``torch.no_grad()``
  crashed. Now inference mode raises before anything runs and ``no_grad`` gives the same
  numbers as a plain call.
- A frozen ``nn.Parameter`` among the meta-parameters, a meta-parameter name the module
  does not have, and an inner learning rate that requires grad (Meta-SGD) were used
  silently (adapted / ignored / zero gradient); they raise, naming the fix. A NaN query
  batch names its task.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import hypergradient as hg
from hypergradient import meta

DT = torch.float64
mse = nn.functional.mse_loss


def tasks_of(n: int, seed: int, din: int = 3, dout: int = 2) -> list:
    gen = torch.Generator().manual_seed(seed)

    def batch(rows: int):
        return (
            torch.randn(rows, din, generator=gen, dtype=DT),
            torch.randn(rows, dout, generator=gen, dtype=DT),
        )

    return [(batch(6), batch(5)) for _ in range(n)]


def by_hand(model, theta, tasks, steps, lr, first_order=False):
    """Mean MAML meta-gradient with autograd through the steps (one task at a time)."""
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for (xs, ys), (xq, yq) in tasks:
        t = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        p = t
        for _ in range(steps):
            loss = mse(functional_call(model, p, (xs,)), ys)
            g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
            p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
        wrt = list(p.values()) if first_order else list(t.values())
        g = torch.autograd.grad(mse(functional_call(model, p, (xq,)), yq), wrt)
        for k, gk in zip(t, g):
            total[k] += gk / len(tasks)
    return total


def max_err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b) / max(
        float(b[k].abs().max()) for k in b
    )


def bn_model(norm: type[nn.Module] = nn.BatchNorm1d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), norm(4), nn.Tanh(), nn.Linear(4, 2)).double()


NORMS = [nn.BatchNorm1d, nn.SyncBatchNorm]  # SyncBatchNorm needs its batch counter


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize(
    "learner",
    [
        lambda m: meta.MAML(m, inner_steps=2, inner_lr=0.1),
        lambda m: meta.MAML(m, inner_steps=2, inner_lr=0.1, first_order=True),
        lambda m: meta.IMAML(m, lam=2.0, inner_steps=2, inner_lr=0.1),
    ],
    ids=["maml", "fomaml", "imaml"],
)
@pytest.mark.parametrize("norm", NORMS)
def test_batchnorm_running_statistics_are_left_alone(learner, vectorize, norm):
    model = bn_model(norm)
    with torch.no_grad():  # non-trivial statistics, which a train-mode pass ignores
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    algo = learner(model)
    algo.vectorize = vectorize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iMAML's stationarity warning: 2 inner steps
        algo.step(meta.parameters_of(model, copy=True), tasks_of(2, 1))
        meta.adapt(model, meta.parameters_of(model), tasks_of(1, 2)[0][0], steps=2, lr=0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_maml_through_a_train_mode_batchnorm_matches_autograd(first_order, vectorize, norm):
    model = bn_model(norm)
    theta, tasks = meta.parameters_of(model, copy=True), tasks_of(3, 3)
    got, _ = meta.maml_step(
        model,
        theta,
        tasks,
        inner_steps=3,
        inner_lr=0.1,
        first_order=first_order,
        vectorize=vectorize,
    )
    assert max_err(got, by_hand(model, theta, tasks, 3, 0.1, first_order)) < 1e-13


def test_an_eval_mode_batchnorm_uses_its_running_statistics():
    model = bn_model()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0]))
    model.eval()
    theta, tasks = meta.parameters_of(model, copy=True), tasks_of(2, 4)
    got, _ = meta.maml_step(model, theta, tasks, inner_steps=2, inner_lr=0.1, vectorize=True)
    assert max_err(got, by_hand(model, theta, tasks, 2, 0.1)) < 1e-13


@pytest.mark.parametrize("first_order", [False, True])
def test_vectorized_maml_with_dropout_draws_each_tasks_masks(first_order):
    """Reference: the stacked problem by hand, under ``vmap(randomness="different")``,
    from the same generator state and in the library's order (one support pass of
    diagnostics before the steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 2)).double()
    theta, tasks, steps, lr = meta.parameters_of(model, copy=True), tasks_of(3, 5), 3, 0.1
    torch.manual_seed(7)
    got, _ = meta.maml_step(
        model, theta, tasks, inner_steps=steps, inner_lr=lr, first_order=first_order, vectorize=True
    )

    xs, ys, xq, yq = (torch.stack([t[i][j] for t in tasks]) for i in (0, 1) for j in (0, 1))
    per_task = vmap(lambda p, x, y: mse(functional_call(model, p, (x,)), y), randomness="different")
    torch.manual_seed(7)
    t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    p = {k: v.unsqueeze(0).expand(len(tasks), *v.shape) for k, v in t.items()}
    with torch.no_grad():
        per_task(p, xs, ys)
    if first_order:
        p = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    stacked = p
    for _ in range(steps):
        g = torch.autograd.grad(
            per_task(p, xs, ys).sum(), list(p.values()), create_graph=not first_order
        )
        p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
    wrt = list(stacked.values()) if first_order else list(t.values())
    g = torch.autograd.grad(per_task(p, xq, yq).mean(), wrt)
    ref = {k: gk.sum(0) if first_order else gk for k, gk in zip(t, g)}
    assert max_err(got, ref) < 1e-13
    assert float(ref["0.weight"].abs().max()) > 1e-3


def test_parameters_of_leaves_frozen_parameters_to_the_module():
    """The frozen layer is a constant of the inner loop and is not trained by the outer one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    theta = meta.parameters_of(model)
    assert list(theta) == ["2.weight", "2.bias"]
    tasks = tasks_of(2, 6)
    got, _ = meta.maml_step(model, theta, tasks, inner_steps=2, inner_lr=0.1)
    assert max_err(got, by_hand(model, theta, tasks, 2, 0.1)) < 1e-13
    phi = meta.adapt(model, theta, tasks[0][0], steps=2, lr=0.1)
    assert set(phi) == set(theta)
    opt = torch.optim.Adam(theta.values(), lr=0.1)
    for k in theta:
        theta[k].grad = got[k]
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight.detach(), frozen[:2, :2])


CALLS = {
    "maml": lambda m, th, ts: meta.maml_step(m, th, ts, inner_steps=2, inner_lr=0.1)[0],
    "fomaml": lambda m, th, ts: meta.maml_step(
        m, th, ts, inner_steps=2, inner_lr=0.1, first_order=True
    )[0],
    "imaml": lambda m, th, ts: meta.imaml_step(
        m, th, ts, lam=1.0, inner_steps=2, inner_lr=0.1, vectorize=True
    )[0],
    "meta_gradient": lambda m, th, ts: meta.MAML(m, inner_steps=2, inner_lr=0.1).meta_gradient(
        th, ts[0]
    )[0],
    "adapt": lambda m, th, ts: meta.adapt(m, th, ts[0][0], steps=2, lr=0.1),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_no_grad_gives_the_same_numbers_and_inference_mode_raises(call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    theta, tasks = meta.parameters_of(model, copy=True), tasks_of(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        plain = CALLS[call](model, theta, tasks)
        with torch.no_grad():
            quiet = CALLS[call](model, theta, tasks)
    assert all(torch.equal(plain[k], quiet[k]) for k in plain)
    moved = {k: v - (theta[k] if call == "adapt" else 0) for k, v in plain.items()}
    assert max(float(v.abs().max()) for v in moved.values()) > 1e-3  # not a no-op
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        CALLS[call](model, theta, tasks)


def test_a_frozen_parameter_passed_as_a_meta_parameter_is_refused():
    """``dict(model.named_parameters())`` with a frozen layer: the frozen weight was adapted
    by the inner loop and got a meta-gradient (which the README loop then applied)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    theta, task = dict(model.named_parameters()), tasks_of(1, 9)[0]
    with pytest.raises(ValueError, match=r"meta_params\['0.weight'\]` is a frozen parameter"):
        meta.maml_step(model, theta, [task], inner_steps=1, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"params\['0.weight'\]` is a frozen parameter"):
        meta.adapt(model, theta, task[0], steps=1, lr=0.1)
    trained = {k: v for k, v in theta.items() if v.requires_grad}
    got, _ = meta.maml_step(model, trained, [task], inner_steps=2, inner_lr=0.1)
    assert max_err(got, by_hand(model, trained, [task], 2, 0.1)) < 1e-13


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize(
    "learner",
    [
        lambda v: meta.MAML(
            lambda p, b: mse(b[0] @ p["w"], b[1]), inner_steps=2, inner_lr=0.1, vectorize=v
        ),
        lambda v: meta.IMAML(
            lambda p, b: mse(b[0] @ p["w"], b[1]), lam=1.0, inner_steps=2, inner_lr=0.1, vectorize=v
        ),
    ],
    ids=["maml", "imaml"],
)
def test_a_nan_query_batch_names_its_task(learner, vectorize):
    """The second-order MAML and iMAML errors spoke of "outer_loss" and "the validation
    batch" at ``params``, without saying which task of the meta-batch."""
    tasks = tasks_of(3, 10, dout=1)
    (xs, ys), (xq, yq) = tasks[2]
    xq = xq.clone()
    xq[1, 0] = float("nan")
    tasks[2] = ((xs, ys), (xq, yq))
    theta = {"w": torch.zeros(3, 1, dtype=DT)}
    with pytest.raises(hg.NonFiniteHypergradientError, match=r"query loss .* of tasks\[2\]") as err:
        learner(vectorize).step(theta, tasks)
    assert "['w']" in err.value.quantity  # the first non-finite quantity: a gradient


def test_a_learned_inner_learning_rate_is_refused_not_silently_ignored():
    """Meta-SGD style: a tensor lr that requires grad got no gradient (``lr.grad`` stayed
    None) and ``inner_lr`` as such a tensor was turned into a float, silently."""
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=r"`inner_lr` is a tensor that requires grad"):
        meta.MAML(model, inner_steps=1, inner_lr=lr)
    with pytest.raises(ValueError, match=r"`inner_optimizer.settings\['lr'\]` is a tensor"):
        meta.IMAML(model, lam=1.0, inner_steps=1, inner_optimizer=hg.optim.sgd(lr=lr))
    with pytest.raises(ValueError, match=r"`optimizer.settings\['beta1'\]` is a tensor"):
        meta.adapt(
            model,
            meta.parameters_of(model),
            tasks_of(1, 11)[0][0],
            steps=1,
            optimizer=hg.optim.adam(betas=(lr, 0.9)),
        )
    theta, tasks = meta.parameters_of(model, copy=True), tasks_of(2, 12)
    detached, _ = meta.maml_step(
        model, theta, tasks, inner_steps=2, inner_optimizer=hg.optim.sgd(lr=lr.detach())
    )
    assert max_err(detached, by_hand(model, theta, tasks, 2, 0.1)) < 1e-13


def test_parameters_of_a_fully_frozen_model_says_so():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Every parameter of `model` is frozen"):
        meta.parameters_of(model)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_meta_parameter_the_module_does_not_have_is_named(first_order):
    """A misspelt key (``0.weights``) became a new attribute nobody reads: the module's own
    weight was used, unadapted, and the key got an exactly zero meta-gradient."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    theta = {"0.weights": torch.ones(2, 3, dtype=DT), "0.bias": torch.zeros(2, dtype=DT)}
    with pytest.raises(ValueError, match=r"meta_params has \['0.weights'\]"):
        meta.maml_step(
            model, theta, tasks_of(1, 13), inner_steps=1, inner_lr=0.1, first_order=first_order
        )
    tied = nn.Linear(3, 3).double()
    shared = nn.Sequential(tied, nn.Tanh(), tied)  # tied weights: every name is known
    theta = {k: v.detach() for k, v in shared.named_parameters(remove_duplicate=False)}
    task = tasks_of(1, 14, dout=3)
    got, _ = meta.maml_step(
        shared, {k: theta[k] for k in ("0.weight", "0.bias")}, task, inner_steps=1, inner_lr=0.1
    )
    ref = by_hand(shared, {k: theta[k] for k in ("0.weight", "0.bias")}, task, 1, 0.1)
    assert max_err(got, ref) < 1e-13
