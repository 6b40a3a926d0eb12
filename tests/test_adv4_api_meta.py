"""``hg.meta`` public helpers: adapt never returns NaN silently; wrong argument forms are named.

- ``hg.meta.adapt`` returned NaN parameters, with no warning, for a support batch holding a
  NaN or a diverged descent (MAML/iMAML on the same batch raise and name the task);
- a list of tensors as the parameters of an ``nn.Module`` loss failed inside
  ``functional_call`` ("Expected all elements of parameter_and_buffer_dicts to be
  dictionaries");
- ``task_batches(vectorize="no")`` stacked the tasks (a truthy string).
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient import meta

DT = torch.float64


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 2, generator=g, dtype=DT)
    return X, torch.randn(6, generator=g, dtype=DT)


def _loss(p, batch):
    X, y = batch
    return 0.5 * ((X @ p[0] - y) ** 2).mean()


def test_adapt_matches_the_closed_form_gradient_descent():
    X, y = _data()
    w0, lr, lam = torch.tensor([0.3, -0.2], dtype=DT), 0.1, 0.5
    out = meta.adapt(_loss, [w0], (X, y), steps=3, lr=lr, lam=lam)
    # gradient of 0.5 mean((X w - y)^2) + lam/2 ||w - w0||^2: X^T (X w - y) / n + lam (w - w0)
    w = w0.clone()
    for _ in range(3):
        w = w - lr * (X.T @ (X @ w - y) / len(y) + lam * (w - w0))
    assert torch.allclose(out[0], w, rtol=1e-14, atol=1e-15)


def test_adapt_on_a_nan_support_batch_raises_naming_the_parameter():
    X, y = _data()
    X[0, 0] = float("nan")
    w0 = torch.zeros(2, dtype=DT)
    with pytest.raises(hg.NonFiniteHypergradientError, match=r"params\[0\] is not finite.*`lr`"):
        meta.adapt(_loss, [w0], (X, y), steps=1, lr=0.1)
    assert torch.equal(w0, torch.zeros(2, dtype=DT))


def test_adapt_that_diverges_to_inf_raises():
    X, y = _data()
    with pytest.raises(hg.NonFiniteHypergradientError, match="diverged"):
        meta.adapt(_loss, [torch.ones(2, dtype=DT)], (1e30 * X, y), steps=6, lr=1e3)


@pytest.mark.parametrize("call", ["adapt", "maml_step"])
def test_a_list_of_tensors_for_a_module_is_named(call):
    model = torch.nn.Linear(2, 1).double()
    loss = meta.module_loss(model)
    X, y = _data()
    params = list(meta.parameters_of(model, copy=True).values())
    with pytest.raises(TypeError, match=r"dict name -> tensor, e.g. hg.meta.parameters_of"):
        if call == "adapt":
            meta.adapt(loss, params, (X, y[:, None]), steps=1, lr=0.1)
        else:
            meta.maml_step(loss, params, [((X, y[:, None]),) * 2], inner_steps=1, inner_lr=0.1)


def test_module_loss_still_takes_a_dict():
    model = torch.nn.Linear(2, 1).double()
    X, y = _data()
    P = meta.parameters_of(model, copy=True)
    got = meta.module_loss(model)(P, (X, y[:, None]))
    want = ((X @ P["weight"].T + P["bias"] - y[:, None]) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-14, atol=0)


def test_task_batches_vectorize_must_be_a_bool():
    X, y = _data()
    with pytest.raises(TypeError, match="`vectorize` must be True or False"):
        meta.task_batches(_loss, [((X, y), (X, y))], "no")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- IMAML rollback
# IMAML.step over tasks one at a time solved the first tasks' systems (updating a stateful
# solver: RecycledCG's basis, NystromPCG's sketch and generator, Neumann's estimate) before a
# later task raised: the next step then differed from that of a twin that never failed.


def _quartic(p, batch):
    X, y = batch
    return ((X @ p["w"] - y) ** 2).mean() + 0.1 * (p["w"] ** 4).sum()


def _tasks(seed, bad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        X = torch.randn(10, 4, generator=g, dtype=DT)
        y = torch.randn(10, generator=g, dtype=DT)
        Xq = X.clone()
        if bad and i == 2:
            Xq[0, 0] = float("inf")
        out.append(((X, y), (Xq, y)))
    return out


SOLVERS = {
    "recycled_cg": lambda: hg.RecycledCG(rank=2),
    "nystrom_pcg": lambda: hg.NystromPCG(rank=2, seed=0),
    "neumann_auto": lambda: hg.Neumann(5, alpha="auto", seed=0),
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_failed_imaml_step_leaves_the_solver_as_it_was(solver):
    P = {"w": torch.linspace(-1.0, 1.0, 4, dtype=DT)}

    def make():
        return meta.IMAML(_quartic, lam=1.0, inner_steps=3, inner_lr=0.1, solver=SOLVERS[solver]())

    a, twin = make(), make()
    a.step(P, _tasks(0))
    twin.step(P, _tasks(0))
    with pytest.raises(hg.NonFiniteHypergradientError, match=r"tasks\[2\]"):
        a.step(P, _tasks(1, bad=True))
    got, _ = a.step(P, _tasks(2))
    want, _ = twin.step(P, _tasks(2))
    assert torch.equal(got["w"], want["w"])
