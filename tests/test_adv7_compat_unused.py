"""A HippoTrainer criterion that never reads a hyperparameter (its value captured as a
number before training, ``lambd = float(theta.exp())``) gives it a zero hypergradient at
every hyper-step: HippoTrainer's T1T2 and Neumann raised autograd's "appears to not have
been used in the graph". The compat layer warned in the core's words, "hparams[0]
influences the outer loss neither directly nor through the inner problem ... Check that
inner_loss or outer_loss uses it", names a HippoTrainer user never wrote. The warning now
names ``hyperparams['theta']``, the criterion and the model; a hyperparameter that is read
keeps its exact hypergradient."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hypergradient import HypergradientWarning
from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

DT = torch.float64
LR = 0.1
g = torch.Generator().manual_seed(0)
X = torch.randn(30, 3, generator=g, dtype=DT)
Y = torch.randn(30, 1, generator=g, dtype=DT)
TRAIN, VAL = (X[:15], Y[:15]), (X[15:], Y[15:])


def _setup(cls):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([-1.0], dtype=DT)
    lost = torch.tensor([0.5], dtype=DT)
    lambd = float(lost.exp())  # captured once: a constant

    def criterion(out, y):
        return ((out - y) ** 2).mean() + (theta.exp() + lambd) * model.weight.square().sum()

    ho = cls(
        {"theta": theta, "lost": lost},
        hyper_lr=0.1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
    )
    return model, theta, lost, lambd, ho


@pytest.mark.parametrize("cls", [T1T2, Neumann, HOAG, DRMAD])
def test_an_unread_hyperparameter_is_named_in_hippotrainers_terms(cls):
    model, theta, lost, _, ho = _setup(cls)
    with pytest.warns(HypergradientWarning, match=r"hyperparams\['lost'\] is read neither") as rec:
        grads = ho.hyper_grad_on_batches(TRAIN, VAL)
    texts = [str(w.message) for w in rec]
    assert not any("hparams[" in t and "inner_loss" in t for t in texts), texts
    assert not any("'theta'" in t for t in texts), texts
    assert torch.equal(grads[1], torch.zeros(1, dtype=DT))
    assert grads[0].abs().item() > 0


def test_the_read_hyperparameter_keeps_its_exact_t1t2_hypergradient():
    model, theta, _, lambd, ho = _setup(T1T2)

    def f(w, t, batch):
        x, y = batch
        return ((x @ w - y[:, 0]) ** 2).mean() + (t.exp().sum() + lambd) * (w**2).sum()

    jac = torch.autograd.functional.jacobian
    w, th = model.weight.detach().reshape(-1).clone(), theta.clone()
    mixed = jac(lambda t: jac(lambda w: f(w, t, TRAIN), w, create_graph=True), th)
    ref = jac(lambda t: f(w, t, VAL), th) - LR * mixed.T @ jac(lambda w: f(w, th, VAL), w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)
        got = ho.hyper_grad_on_batches(TRAIN, VAL)[0]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_as_an_error_it_stops_the_hyper_step_before_any_update():
    model, theta, lost, _, ho = _setup(T1T2)
    before = (theta.clone(), lost.clone())
    model(X).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        with pytest.raises(HypergradientWarning, match=r"hyperparams\['lost'\]"):
            ho.step()
    assert torch.equal(theta, before[0]) and torch.equal(lost, before[1])


@pytest.mark.parametrize("cls", [T1T2, Neumann, HOAG])
def test_the_hook_path_warns_too(cls):
    """A criterion reading the weights through a list of its own goes through the hook
    (HippoTrainer's graphs); that path returned the zero without a word."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    weights = list(model.parameters())
    theta = torch.tensor([-1.0], dtype=DT)
    lost = torch.tensor([0.5], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta.exp() * sum(w.square().sum() for w in weights)

    ho = cls(
        {"theta": theta, "lost": lost},
        hyper_lr=0.1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
    )
    with pytest.warns(HypergradientWarning, match=r"hyperparams\['lost'\] is read neither") as rec:
        grads = ho.hyper_grad_on_batches(TRAIN, VAL)
    assert not any("'theta'" in str(w.message) for w in rec)
    assert torch.equal(grads[1], torch.zeros(1, dtype=DT)) and grads[0].abs().item() > 0
    theta.requires_grad_(True)
    lost.requires_grad_(True)
    with pytest.warns(HypergradientWarning, match=r"hyperparams\['lost'\]"):
        ho.hyper_grad(criterion(model(TRAIN[0]), TRAIN[1]), criterion(model(VAL[0]), VAL[1]))


def test_a_criterion_warning_is_shown_once_not_at_every_hyper_step():
    """The translation records the hyper-step's warnings and re-emits them; recording resets
    Python's once-per-place registries, so a criterion's warning came back at every
    hyper-step (here 4 times) where plain Python shows it once."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([-1.0], dtype=DT)

    def criterion(out, y):
        warnings.warn("criterion: a deprecated option", UserWarning, stacklevel=1)
        return ((out - y) ** 2).mean() + theta.exp() * model.weight.square().sum()

    ho = T1T2(
        {"theta": theta},
        hyper_lr=0.1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(4):
            ho.hyper_grad_on_batches(TRAIN, VAL)
    said = [w for w in caught if "deprecated option" in str(w.message)]
    assert len(said) == 1 and said[0].category is UserWarning
