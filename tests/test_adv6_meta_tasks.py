"""Adversarial review of ``hg.meta``: task batches and losses as users write them.

Each test failed on the code before the review:

- A support loss that may be negative (a Gaussian negative log-likelihood with a learned
  log-variance): an adaptation that blew it up from -1.6 to 1.2e4 returned a meta-gradient
  of -5e4 with no warning and a ``fixed_budget`` status (the divergence check required a
  positive loss at ``meta_params``).
- ``vectorize=True`` turned namedtuple batches into plain tuples: a loss reading
  ``batch.x`` crashed with ``AttributeError: 'tuple' object has no attribute 'x'``.
- ``vectorize=True`` with a batch holding a string or an int said the batch "must be a
  tensor, a tuple or list of tensors, or a dict of tensors (for a module:
  dict(model.named_parameters()))", a hint about parameters, not batches.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient import meta
from hypergradient.methods.growth import adaptation_failed

DT = torch.float64


def nll(p, batch):
    """Gaussian negative log-likelihood (up to a constant): negative for a good fit."""
    x, y = batch
    return (0.5 * (y - p["w"] * x) ** 2 * torch.exp(-p["logvar"]) + 0.5 * p["logvar"]).mean()


def nll_task():
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(8, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    return (x, 2 * x + 0.01 * torch.randn(8, generator=g, dtype=DT)), (xq, 2 * xq)


def by_hand(theta, task, steps, lr):
    t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    p = t
    for _ in range(steps):
        g = torch.autograd.grad(nll(p, task[0]), list(p.values()), create_graph=True)
        p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
    return dict(zip(t, torch.autograd.grad(nll(p, task[1]), list(t.values()))))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [False, True])
def test_a_negative_support_loss_that_blows_up_is_reported(first_order, vectorize):
    theta = {"w": torch.tensor(1.9, dtype=DT), "logvar": torch.tensor(-4.0, dtype=DT)}
    task = nll_task()
    kw = dict(inner_steps=5, inner_lr=2.0, first_order=first_order, vectorize=vectorize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad, info = meta.maml_step(nll, theta, [task, task], **kw)
    t = info.tasks[0]
    assert t.support_loss_before == pytest.approx(-1.613, abs=1e-3)
    assert t.support_loss_after > 1e4
    assert info.status == hg.Status.DIVERGED
    assert [x.status for x in info.tasks] == ["diverged", "diverged"]
    assert sum("diverged" in str(w.message) for w in caught) == 1
    if not first_order:  # still the exact meta-gradient of the run taken
        ref = by_hand(theta, task, 5, 2.0)
        assert max(abs(float(grad[k] - ref[k])) / abs(float(ref[k])) for k in ref) < 1e-12


def test_a_healthy_adaptation_of_a_negative_loss_is_not_flagged():
    theta = {"w": torch.tensor(1.9, dtype=DT), "logvar": torch.tensor(-4.0, dtype=DT)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = meta.maml_step(nll, theta, [nll_task()], inner_steps=5, inner_lr=0.01)
    assert info.status == hg.Status.FIXED_BUDGET
    assert info.tasks[0].support_loss_after < info.tasks[0].support_loss_before < 0


def test_adaptation_failed_for_any_sign_of_the_starting_loss():
    assert adaptation_failed(1.0, 10.0) and not adaptation_failed(1.0, 9.9)  # as before
    assert adaptation_failed(-1.6, 149.0) and adaptation_failed(-1.0, 8.0)
    assert not adaptation_failed(-1.0, 7.9) and not adaptation_failed(-1.0, -2.0)
    assert not adaptation_failed(0.0, 1e-3) and not adaptation_failed(0.0, 0.0)  # no scale
    assert not adaptation_failed(1.0, float("inf")) and not adaptation_failed(float("nan"), 1.0)


Batch = collections.namedtuple("Batch", "x y")


def field_loss(p, b):
    return ((torch.tanh(b.x @ p["w"]) - b.y) ** 2).mean()


def namedtuple_tasks():
    g = torch.Generator().manual_seed(1)

    def batch(n):
        return Batch(
            torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
        )

    return [(batch(6), batch(5)) for _ in range(3)]


@pytest.mark.parametrize(
    "learner",
    [
        lambda: meta.MAML(field_loss, inner_steps=2, inner_lr=0.1),
        lambda: meta.MAML(field_loss, inner_steps=2, inner_lr=0.1, first_order=True),
        lambda: meta.IMAML(field_loss, lam=1.0, inner_steps=100, inner_lr=0.2, solver=hg.Exact()),
    ],
    ids=["maml", "fomaml", "imaml"],
)
def test_vectorized_namedtuple_batches_keep_their_fields(learner):
    theta = {"w": torch.tensor([0.3, -0.2, 0.5], dtype=DT)}
    tasks = namedtuple_tasks()
    algo = learner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iMAML's stationarity note, if any
        one_by_one, _ = algo.step(theta, tasks)
        algo.vectorize = True
        stacked, _ = algo.step(theta, tasks)
    assert float((one_by_one["w"] - stacked["w"]).abs().max()) < 1e-12
    assert float(one_by_one["w"].abs().max()) > 1e-3


def test_stacked_batches_keep_their_container_types():
    tasks = namedtuple_tasks()
    stacked = meta.StackedTasks(field_loss, tasks)
    assert type(stacked.support) is Batch and stacked.support.x.shape == (3, 6, 3)
    assert torch.equal(stacked.query.y[1], tasks[1][1].y)
    od = collections.OrderedDict(x=torch.ones(2), y=torch.zeros(2))
    pair = meta.StackedTasks(lambda p, b: b["x"].sum() * p, [(od, od), (od, od)])
    assert type(pair.support) is collections.OrderedDict and list(pair.support) == ["x", "y"]


@pytest.mark.parametrize("extra", ["tag", 3])
def test_a_non_tensor_in_a_stacked_batch_is_named_with_the_fix(extra):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    tasks = [((x, y, extra), (x, y, extra))] * 2
    with pytest.raises(TypeError, match=r"support\[0\]\[2\] is a .*Use vectorize=False") as e:
        meta.maml_step(
            lambda p, b: ((b[0] @ p - b[1]) ** 2).mean(),
            torch.zeros(3, dtype=DT),
            tasks,
            inner_steps=1,
            inner_lr=0.1,
            vectorize=True,
        )
    assert "named_parameters" not in str(e.value)


def lsq(p, batch):
    x, y = batch
    return ((x @ p["w"] - y) ** 2).mean()


@pytest.mark.parametrize("how", ["adapt", "maml", "imaml"])
def test_a_diverged_adaptation_by_adapt_warns_at_the_callers_line(how):
    """``adapt`` returned parameters whose support loss was 6e19 (from 0.28), silently."""
    g = torch.Generator().manual_seed(0)
    support = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    theta = {"w": torch.zeros(3, dtype=DT)}
    calls = {
        "adapt": lambda lr: meta.adapt(lsq, theta, support, steps=10, lr=lr),
        "maml": lambda lr: meta.MAML(lsq, inner_steps=10, inner_lr=lr).adapt(theta, support),
        "imaml": lambda lr: meta.IMAML(lsq, lam=0.1, inner_steps=10, inner_lr=lr).adapt(
            theta, support
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = calls[how](0.05)
    assert float(lsq(good, support)) < float(lsq(theta, support))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = calls[how](5.0)
    (w,) = caught
    assert "diverged" in str(w.message) and w.filename == __file__
    assert float(lsq(bad, support)) > 1e19  # still returned: the descent that was asked for


def test_the_public_task_batch_classes_check_their_arguments():
    """``StackedTasks(loss, [])`` raised ``IndexError``, a task of three items ``too many
    values to unpack``, a None loss ``'NoneType' object is not callable`` at first use."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    pair = ((x, y), (x, y))
    with pytest.raises(ValueError, match="`tasks` is empty"):
        meta.StackedTasks(lsq, [])
    with pytest.raises(TypeError, match=r"`tasks\[1\]` must be a pair .* a tuple of 3 items"):
        meta.StackedTasks(lsq, [pair, (x, y, x)])
    with pytest.raises(TypeError, match="`task` must be a pair .* a tuple of 1 items"):
        meta.SingleTask(lsq, ((x, y),))
    for make in (lambda: meta.StackedTasks(None, [pair]), lambda: meta.SingleTask(None, pair)):
        with pytest.raises(TypeError, match="`loss_fn` must be a callable"):
            make()
    with pytest.raises(TypeError, match=r"got a dict with keys \['support', 'query'\]"):
        meta.maml_step(
            lsq, {"w": torch.zeros(3, dtype=DT)}, [{"support": (x, y), "query": (x, y)}],
            inner_steps=1, inner_lr=0.1,
        )  # fmt: skip
