"""Adversarial review of ``hg.meta``: what a user is told, and where.

Each test failed on the code before the review:

- iMAML's not-stationary warning told the user to "pass stationarity=None to skip this
  check" (``IMAML`` has no such argument) and to "train the inner problem further before
  the call" (the call does the training: ``inner_steps``); it pointed into ``imaml.py``.
- The diverged-adaptation warning pointed into ``base.py``, not at the user's call (with
  the default filter, one warning per library line for the whole process).
- Meta-parameters holding a tied tensor under both names (as ``state_dict()`` lists it)
  crashed inside ``functional_call`` with "Consider using tie_weights=False", an argument
  the user cannot pass.
- ``vectorize=True`` with a loss ``vmap`` cannot run (an ``nn.LSTM``) raised torch's
  "Batching rule not implemented" without saying that ``vectorize=False`` works.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hypergradient import meta

DT = torch.float64


def lsq(p, batch):
    x, y = batch
    return ((x @ p["w"] - y) ** 2).mean()


def lsq_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    return (x, y), (x + 0.1, y)


THETA = {"w": torch.tensor([0.5, -0.3, 0.2], dtype=DT)}


@pytest.mark.parametrize("how", ["object", "function", "one_task"])
def test_imamls_stationarity_warning_names_its_own_fix_at_the_callers_line(how):
    algo = meta.IMAML(lsq, lam=1.0, inner_steps=1, inner_lr=0.1)
    calls = {
        "object": lambda: algo.step(THETA, [lsq_task()]),
        "function": lambda: meta.imaml_step(
            lsq, THETA, [lsq_task()], lam=1.0, inner_steps=1, inner_lr=0.1
        ),
        "one_task": lambda: algo.meta_gradient(THETA, lsq_task()),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls[how]()
    (w,) = [w for w in caught if "inner objective" in str(w.message)]
    text = str(w.message)
    assert "inner_steps" in text and "inner_grad_norm" in text
    assert "stationarity=None" not in text and "before the call" not in text
    assert w.filename == __file__, w.filename


def test_imaml_still_warns_exactly_when_the_inner_problem_is_not_solved():
    algo = meta.IMAML(lsq, lam=1.0, inner_steps=500, inner_lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = algo.step(THETA, [lsq_task(), lsq_task(1)])
    assert info.max_inner_grad_norm < 1e-10


@pytest.mark.parametrize("vectorize", [False, True])
def test_the_diverged_adaptation_warning_points_at_the_callers_line(vectorize):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta.maml_step(lsq, THETA, [lsq_task()], inner_steps=5, inner_lr=5.0, vectorize=vectorize)
    (w,) = [w for w in caught if "diverged" in str(w.message)]
    assert w.filename == __file__, w.filename


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 3, bias=False)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


def tied_tasks():
    g = torch.Generator().manual_seed(1)

    def batch(n):
        return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)

    return [(batch(5), batch(4)), (batch(5), batch(4))]


def test_a_tied_tensor_given_under_both_names_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = Tied().double()
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    assert {"emb.weight", "out.weight"} <= set(theta)
    with pytest.raises(ValueError, match="both 'emb.weight' and 'out.weight'.*tied") as e:
        meta.maml_step(model, theta, tied_tasks(), inner_steps=2, inner_lr=0.2)
    assert "tie_weights" not in str(e.value)
    with pytest.raises(ValueError, match="tied"):
        meta.adapt(model, theta, tied_tasks()[0][0], steps=1, lr=0.1)


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_tied_tensor_given_once_gets_the_meta_gradient_of_both_uses(vectorize):
    torch.manual_seed(0)
    model = Tied().double()
    theta, tasks, mse = meta.parameters_of(model, copy=True), tied_tasks(), nn.functional.mse_loss
    assert "out.weight" not in theta
    got, _ = meta.maml_step(model, theta, tasks, inner_steps=2, inner_lr=0.2, vectorize=vectorize)
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for (xs, ys), (xq, yq) in tasks:
        t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        p = t
        for _ in range(2):
            g = torch.autograd.grad(
                mse(functional_call(model, p, (xs,)), ys), list(p.values()), create_graph=True
            )
            p = {k: v - 0.2 * gk for (k, v), gk in zip(p.items(), g)}
        g = torch.autograd.grad(mse(functional_call(model, p, (xq,)), yq), list(t.values()))
        for k, gk in zip(t, g):
            total[k] += gk / len(tasks)
    assert max(float((got[k] - total[k]).abs().max()) for k in total) < 1e-14


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(2, 3, batch_first=True)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_a_loss_vmap_cannot_run_names_vectorize_false():
    torch.manual_seed(0)
    model = Recurrent().double()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return torch.randn(n, 4, 2, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)

    tasks = [(batch(3), batch(2)), (batch(3), batch(2))]
    theta = meta.parameters_of(model, copy=True)
    with pytest.raises(RuntimeError, match="(?s)Batching rule.*use vectorize=False"):
        meta.maml_step(model, theta, tasks, inner_steps=1, inner_lr=0.1, vectorize=True)
    got, _ = meta.maml_step(model, theta, tasks, inner_steps=1, inner_lr=0.1)  # the fix works
    assert all(torch.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize(
    "call",
    [
        lambda t: meta.maml_step(lsq, t, [lsq_task()], inner_steps=2, inner_lr=0.1),
        lambda t: meta.maml_step(lsq, t, [lsq_task()], inner_steps=2, inner_lr=0.1, vectorize=True),
        lambda t: meta.imaml_step(lsq, t, [lsq_task()], lam=1.0, inner_steps=2, inner_lr=0.1),
        lambda t: meta.MAML(lsq, inner_steps=2, inner_lr=0.1).meta_gradient(t, lsq_task()),
        lambda t: meta.adapt(lsq, t, lsq_task()[0], steps=2, lr=0.1),
    ],
    ids=["maml", "maml_vectorized", "imaml", "meta_gradient", "adapt"],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_meta_parameters_are_named_not_blamed_on_the_task(call, value):
    """A NaN in ``meta_params`` (an outer step that blew up) was reported as "the support
    loss at meta_params of tasks[0] is not finite. Check tasks[0]'s support batch" (adapt:
    "lower lr or steps, or check the support batch")."""
    theta = {"w": torch.tensor([0.1, value, 0.3], dtype=DT)}
    with pytest.raises(ValueError, match=r"\['w'\] contains NaN or Inf.*outer optimizer") as e:
        call(theta)
    assert "tasks[0]" not in str(e.value) and "support batch" not in str(e.value)


def twenty_tasks():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(20):
        x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
        tasks.append(((x, y), (x + 0.3, y)))
    return tasks


def stationarity_warnings(steps: int, vectorize: bool) -> tuple[list[str], meta.MetaInfo]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = meta.imaml_step(
            lsq, THETA, twenty_tasks(), lam=1.0, inner_steps=steps, inner_lr=0.2,
            vectorize=vectorize,
        )  # fmt: skip
    return [str(w.message) for w in caught if "inner objective" in str(w.message)], info


def test_vectorized_imaml_checks_stationarity_per_task_as_the_per_task_path_does():
    """The stacked check compared the summed inner gradient with the gradient of the *mean*
    query loss (B times smaller): 20 tasks that each passed the check warned when stacked
    (15 inner steps); a per-task check now, naming the worst task."""
    one_by_one, _ = stationarity_warnings(15, vectorize=False)
    stacked, _ = stationarity_warnings(15, vectorize=True)
    assert one_by_one == [] and stacked == []
    one_by_one, info = stationarity_warnings(10, vectorize=False)
    stacked, _ = stationarity_warnings(10, vectorize=True)
    assert len(one_by_one) == 1 and len(stacked) == 1
    worst = max(range(20), key=lambda i: info.tasks[i].inner_grad_norm)
    assert f"tasks[{worst}], the worst of 1 of 20 tasks" in stacked[0]


def test_a_state_dict_as_meta_parameters_names_the_running_statistic():
    """``model.state_dict()`` was refused for its integer batch counter with the advice to
    convert it with ``.float()`` (which then met the running-statistic refusal)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 1, generator=g, dtype=DT)
    for call in (
        lambda: meta.maml_step(
            model, model.state_dict(), [(batch, batch)], inner_steps=1, inner_lr=0.1
        ),
        lambda: meta.adapt(model, model.state_dict(), batch, steps=1, lr=0.1),
    ):
        with pytest.raises(ValueError, match="'1.running_mean', a normalization layer's") as e:
            call()
        assert ".float()" not in str(e.value)
