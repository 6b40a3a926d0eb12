"""T1T2 differentiates the step taken with that step's random draws (a noise augmentation
inside ``train_loss`` whose scale is the hyperparameter).

A loop computing its own loss leaves the driver the random-number state at the end of the
previous step; when something drew in between (here a seed set in the loop; in practice a
DataLoader's random augmentation), T1T2 replayed another draw and applied its
hypergradient silently (-0.18 for an exact 0.033): the hyper-step is now skipped with a
warning. And after ``load_state_dict`` T1T2's first hyper-step replayed no recorded state
(fresh noise): the resumed run's hyperparameter differed from the original's
(0.29542 for 0.29020).
"""

import io
import warnings

import pytest
import torch
from torch.func import functional_call

import hypergradient as hg

D = torch.float64


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = x @ torch.randn(3, generator=g, dtype=D) + 0.3 * torch.randn(n, generator=g, dtype=D)
    return x, y


X, Y = _data(12, 0)
XV, YV = _data(8, 5)
BATCHES = [(X[i : i + 4], Y[i : i + 4]) for i in (0, 4, 8)]


def train_loss(m, h, batch):
    x, t = batch
    noisy = x + h["s"] * torch.randn_like(x)
    return ((m(noisy).squeeze(-1) - t) ** 2).mean()


def val_loss(m, h, batch):
    x, t = batch
    return ((m(x).squeeze(-1) - t) ** 2).mean()


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(3, 1).double()


def _hopt(m, outer_lr=1e-3):
    return hg.HyperOptimizer(
        m,
        {"s": hg.Positive(torch.tensor(0.3, dtype=D))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=outer_lr),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=3,
    )


def _reference(before, raw0, seed):
    """The exact one-step hypergradient of the last step, drawn from ``seed``."""
    m = _model()
    p = {k: v.clone().requires_grad_(True) for k, v in before.items()}
    raw = raw0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss = train_loss(lambda x: functional_call(m, p, (x,)), {"s": raw.exp()}, BATCHES[2])
    grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
    after = {k: v - 0.1 * g for (k, v), g in zip(p.items(), grads)}
    val = val_loss(lambda x: functional_call(m, after, (x,)), None, (XV, YV))
    return torch.autograd.grad(val, raw)[0]


def _run(own, seeded):
    m = _model()
    hopt = _hopt(m)
    raw0 = hopt.raw_hparams()[0].detach().clone()
    before = None
    torch.manual_seed(7)
    for t, batch in enumerate(BATCHES):
        if seeded:
            torch.manual_seed(100 + t)  # something in the loop draws or seeds
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        hopt.zero_grad()
        loss = train_loss(m, hopt.hparams, batch) if own else hopt.train_loss(batch)
        loss.backward()
        hopt.step(batch)
    return hopt, raw0, before


def test_own_loss_with_draws_between_steps_is_skipped():
    with pytest.warns(hg.HypergradientWarning, match="another step's"):
        hopt, raw0, _ = _run(own=True, seeded=True)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0
    assert torch.equal(hopt.raw_hparams()[0].detach(), raw0)


def test_train_loss_with_draws_between_steps_is_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        hopt, raw0, before = _run(own=False, seeded=True)
    got = (raw0 - hopt.raw_hparams()[0].detach()) / 1e-3
    torch.testing.assert_close(got, _reference(before, raw0, 102), rtol=1e-9, atol=0)


def test_own_loss_without_draws_between_steps_is_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        torch.manual_seed(7)
        state = None
        m = _model()
        hopt = _hopt(m)
        raw0 = hopt.raw_hparams()[0].detach().clone()
        for batch in BATCHES:
            before = {k: v.detach().clone() for k, v in m.named_parameters()}
            state = torch.get_rng_state()  # what the step's loss draws from
            hopt.zero_grad()
            train_loss(m, hopt.hparams, batch).backward()
            hopt.step(batch)
    assert hopt.skipped == 0 and hopt.hyper_steps == 1
    m = _model()  # (seeds torch)
    torch.set_rng_state(state)
    p = {k: v.clone().requires_grad_(True) for k, v in before.items()}
    raw = raw0.clone().requires_grad_(True)
    loss = train_loss(lambda x: functional_call(m, p, (x,)), {"s": raw.exp()}, BATCHES[2])
    grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
    after = {k: v - 0.1 * g for (k, v), g in zip(p.items(), grads)}
    val = val_loss(lambda x: functional_call(m, after, (x,)), None, (XV, YV))
    want = torch.autograd.grad(val, raw)[0]
    got = (raw0 - hopt.raw_hparams()[0].detach()) / 1e-3
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def _resume_hopt(m):
    return hg.HyperOptimizer(
        m,
        {"s": hg.Positive(torch.tensor(0.3, dtype=D))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
    )


def _own_step(m, hopt, batch):
    hopt.zero_grad()
    train_loss(m, hopt.hparams, batch).backward()
    hopt.step(batch)


def test_resumed_t1t2_replays_the_first_steps_draws():
    torch.manual_seed(0)
    m = _model()
    hopt = _resume_hopt(m)
    _own_step(m, hopt, BATCHES[0])
    buffer = io.BytesIO()
    torch.save({"model": m.state_dict(), "hopt": hopt.state_dict()}, buffer)
    _own_step(m, hopt, BATCHES[1])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _model()
    resumed_model.load_state_dict(saved["model"])
    resumed = _resume_hopt(resumed_model)
    resumed.load_state_dict(saved["hopt"])  # restores torch's random-number state too
    _own_step(resumed_model, resumed, BATCHES[1])
    assert torch.equal(resumed.raw_hparams()[0], hopt.raw_hparams()[0])
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), resumed_model.parameters()))


def test_own_loss_with_clipped_gradient_norm_is_not_skipped():
    """The check compares directions: ``clip_grad_norm_`` is the same draw, not another
    one; the clipping itself is reported (a step T1T2 does not differentiate: warned, and
    applied with on_divergence="warn"; tests/test_adv13_t1t2_clipping.py)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = _model()
        hopt = _hopt(m)
        torch.manual_seed(7)
        for batch in BATCHES:
            hopt.zero_grad()
            train_loss(m, hopt.hparams, batch).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
            hopt.step(batch)
    ours = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert len(ours) == 1 and "not train_loss's gradient" in ours[0], ours
    assert hopt.skipped == 0 and hopt.hyper_steps == 1


def test_dataloader_shuffling_from_the_global_generator_skips_epoch_starts():
    """A DataLoader without its own generator draws its shuffling seed from torch's at each
    epoch's start, between two steps: the first step of every epoch (and only it) had its
    dropout masks replayed wrong."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2)
    )
    ce = torch.nn.functional.cross_entropy

    def loss(m, h, b):
        return ce(m(b[0]), b[1]) + 0.5 * (h["d"] * m[0].weight ** 2).sum()

    hopt = hg.HyperOptimizer(
        net,
        {"d": hg.Positive(torch.full((16, 5), 1e-3))},
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=loss,
        val_loss=lambda m, h, b: ce(m(b[0]), b[1]),
        val_data=(x, y),
        method=hg.T1T2(),
        inner_steps=1,
    )
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    with pytest.warns(hg.HypergradientWarning, match="another step's") as record:
        for _ in range(2):
            for batch in loader:
                hopt.zero_grad()
                loss(net, hopt.hparams, batch).backward()
                hopt.step(batch)
    steps = sorted(int(str(w.message).split(":")[0].split()[1]) for w in record)
    assert steps == [1, 5] and hopt.skipped == 2 and hopt.hyper_steps == 6


@pytest.mark.parametrize("source", ["numpy", "generator"])
def test_noise_from_another_generator_is_skipped(source):
    """Noise from numpy or a private torch.Generator is not in the recorded state: T1T2
    replayed other noise (0.031 and -0.103 for exact 0.113 and 0.118)."""
    import numpy as np

    rs, gen = np.random.RandomState(0), torch.Generator().manual_seed(0)

    def loss(m, h, batch):
        x, t = batch
        if source == "numpy":
            noise = torch.from_numpy(rs.standard_normal(tuple(x.shape)))
        else:
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return ((m(x + h["s"] * noise).squeeze(-1) - t) ** 2).mean()

    m = _model()
    hopt = hg.HyperOptimizer(
        m,
        {"s": hg.Positive(torch.tensor(0.3, dtype=D))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=1e-3),
        train_loss=loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=3,
    )
    raw0 = hopt.raw_hparams()[0].detach().clone()
    with pytest.warns(hg.HypergradientWarning, match="another generator"):
        for batch in BATCHES:
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    assert hopt.skipped == 1 and torch.equal(hopt.raw_hparams()[0].detach(), raw0)


def test_replayability_is_checked_once():
    """Two extra forward passes at the first hyper-step, none at the later ones."""
    calls = []

    def counted(m, h, batch):
        calls.append(1)
        return train_loss(m, h, batch)

    m = _model()
    hopt = hg.HyperOptimizer(
        m,
        {"s": hg.Positive(torch.tensor(0.3, dtype=D))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=1e-3),
        train_loss=counted,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
    )
    per_step = []
    for batch in BATCHES:
        before = len(calls)
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
        per_step.append(len(calls) - before)
    assert per_step[1:] == [per_step[1]] * 2 and per_step[0] == per_step[1] + 2
    assert hopt.hyper_steps == 3


def test_a_loss_that_differentiates_inside_passes_the_checks():
    """An input-gradient penalty (``torch.autograd.grad`` inside ``train_loss``) runs under
    the replay checks as under T1T2 itself, without a warning."""

    def penalized(m, h, batch):
        x, t = batch
        x = x.clone().requires_grad_(True)
        out = m(x).squeeze(-1)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return ((out - t) ** 2).mean() + h["s"] * (gx**2).sum(1).mean()

    m = _model()
    hopt = hg.HyperOptimizer(
        m,
        {"s": hg.Positive(torch.tensor(0.1, dtype=D))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=1e-3),
        train_loss=penalized,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in BATCHES:
            hopt.zero_grad()
            penalized(m, hopt.hparams, batch).backward()
            hopt.step(batch)
    assert hopt.hyper_steps == 3 and hopt.skipped == 0
