"""The HippoTrainer layer refuses a value computed once from a hyperparameter
(``lambd = theta.exp()`` before training: never tuned). It also refused a value the
criterion recomputes at every call and keeps as an attribute (``self.lam =
self.theta.exp()`` in ``forward``, for logging) whenever a forward pass ran before the
construction with ``theta`` requiring grad (HippoTrainer's demo creates it so): the
attribute carried a graph to ``theta``, and the error told the user to compute the value
inside ``forward``, which they did. HippoTrainer runs this code. A tensor found is now
confirmed by one forward pass without a graph (RNG state and buffers untouched); the
genuine case is still refused, and the accepted one gets the T1-T2 hypergradient of the
closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hypergradient.compat.hippotrainer import T1T2

DT = torch.float64
LR = 0.05
g = torch.Generator().manual_seed(0)
X = torch.randn(40, 5, generator=g, dtype=DT)
Y = X @ torch.randn(5, 1, generator=g, dtype=DT) + 0.1 * torch.randn(40, 1, generator=g)
TRAIN, VAL = (X[:20], Y[:20]), (X[20:], Y[20:])


class LoggingCriterion(nn.Module):
    def __init__(self, model, theta):
        super().__init__()
        self.model, self.theta = model, theta

    def forward(self, out, target):
        self.lam = self.theta.exp()  # recomputed at every call, kept for logging
        return ((out - target) ** 2).mean() + (self.lam * self.model.weight[0].square()).sum()


class ScaledModel(nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.lin = nn.Linear(5, 1, bias=False)
        self.theta = theta

    def forward(self, x):
        self.scale = self.theta.exp()  # recomputed at every call
        return self.lin(x * self.scale)


def _t1t2_reference(w, theta):
    """d_phi g - lr (d_phi grad_w f)^T grad_w g for the logging criterion's ridge loss."""
    jac = torch.autograd.functional.jacobian
    w, th = w.detach().reshape(-1).clone(), theta.detach().clone()

    def loss(batch):
        return lambda w, t: (
            ((batch[0] @ w[:, None] - batch[1]) ** 2).mean() + (t.exp() * w**2).sum()
        )

    f, gv = loss(TRAIN), loss(VAL)
    mixed = jac(lambda t: jac(lambda w: f(w, t), w, create_graph=True), th)
    return jac(lambda t: gv(w, t), th) - LR * mixed.T @ jac(lambda w: gv(w, th), w)


def test_a_value_recomputed_in_forward_is_accepted_and_tuned_exactly():
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    theta = torch.full((5,), -2.0, dtype=DT, requires_grad=True)
    criterion = LoggingCriterion(model, theta)
    criterion(model(TRAIN[0]), TRAIN[1])  # a forward pass before construction (logging)
    hopt = T1T2(
        {"theta": theta},
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
    )
    expected = _t1t2_reference(model.weight, theta)
    torch.testing.assert_close(hopt.hyper_grad_on_batches(TRAIN, VAL)[0], expected)
    before = theta.detach().clone()
    loss = criterion(model(TRAIN[0]), TRAIN[1])
    loss.backward()
    hopt.step(loss)
    assert not torch.equal(theta.detach(), before)


def test_a_model_value_recomputed_in_forward_is_accepted():
    theta = torch.zeros(5, dtype=DT, requires_grad=True)
    model = ScaledModel(theta).double()
    model(TRAIN[0])  # leaves model.scale with a graph to theta
    T1T2(
        {"theta": theta},
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=nn.MSELoss(),
    )


def test_a_value_computed_once_is_still_refused_and_nothing_is_disturbed():
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    theta = torch.full((5,), -2.0, dtype=DT, requires_grad=True)
    lambd = theta.exp()  # computed once: never tuned

    def criterion(out, target):
        return ((out - target) ** 2).mean() + (lambd * model.weight[0].square()).sum()

    loader = DataLoader(TensorDataset(*TRAIN), batch_size=4, shuffle=True)
    rng, weights = torch.get_rng_state(), model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"lambd was computed once from hyperparams\['theta'\]"):
        T1T2(
            {"theta": theta},
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            train_loader=loader,
            val_loader=[VAL],
            criterion=criterion,
        )
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model.weight, weights)


def _stale_criteria(model, lam):
    def positional(out, target, lam=lam):
        return ((out - target) ** 2).mean() + (lam * model.weight[0].square()).sum()

    def keyword_only(out, target, *, lam=lam):
        return ((out - target) ** 2).mean() + (lam * model.weight[0].square()).sum()

    class Holder:
        L = lam  # a class attribute

        def __call__(self, out, target):
            return ((out - target) ** 2).mean() + (self.L * model.weight[0].square()).sum()

    return {
        "criterion:lam": positional,
        "criterion:lam ": keyword_only,
        "criterion.L": Holder(),
    }


@pytest.mark.parametrize("where", ["criterion:lam", "criterion:lam ", "criterion.L"])
def test_values_computed_once_in_defaults_or_class_attributes_are_refused(where):
    """These were not searched: the loop then failed with autograd's "Trying to backward
    through the graph a second time"."""
    model = nn.Linear(5, 1, bias=False).double()
    theta = torch.full((5,), -2.0, dtype=DT, requires_grad=True)
    criterion = _stale_criteria(model, theta.exp())[where]
    with pytest.raises(ValueError, match=rf"{where.strip()} was computed once"):
        T1T2(
            {"theta": theta},
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            train_loader=[TRAIN],
            val_loader=[VAL],
            criterion=criterion,
        )


def test_a_value_computed_once_out_of_reach_is_named_at_the_hyper_step():
    model = nn.Linear(5, 1, bias=False).double()
    theta = torch.full((5,), -2.0, dtype=DT, requires_grad=True)
    deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": theta.exp()}}}}}}}  # beyond the search

    def criterion(out, target):
        lam = deep["a"]["b"]["c"]["d"]["e"]["f"]["g"]
        return ((out - target) ** 2).mean() + (lam * model.weight[0].square()).sum()

    hopt = T1T2(
        {"theta": theta},
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
    )
    before = theta.detach().clone()
    with pytest.raises(ValueError, match="computed once from a hyperparameter"):
        hopt.hyper_step()
    assert torch.equal(theta.detach(), before)
