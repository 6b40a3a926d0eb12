"""Architectures the zoo does not cover, through ``HyperOptimizer`` (adversarial round 6).

A 2-layer LSTM on packed sequences with dropout between its layers, a pre-norm causal
``TransformerEncoder`` with a key-padding mask (nested tensors enabled), an orthogonal
parametrization (``matrix_exp``) and an embedding tied to the output layer. For each:
``Unrolled`` equals central differences of the same training run in float64 (dropout masks
included), ``T1T2`` equals central differences of the last step alone (its exact quantity),
and the hyper-step leaves weights, buffers, the train flag and torch's RNG as plain training.
These held up in the round's probes; the test keeps them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import pack_padded_sequence

import hypergradient as hg

DT = torch.float64
LR, MOMENTUM, SEED, T = 0.1, 0.9, 9, 5


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, batch_first=True, dropout=0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, batch):
        x, lens = batch
        packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][0][-1])


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.2, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(4, 3)

    def forward(self, batch):
        x, pad = batch
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
        y = self.body(x, mask=mask, src_key_padding_mask=pad, is_causal=True)
        keep = (~pad).to(x.dtype)[..., None]
        return self.head((y * keep).sum(1) / keep.sum(1))


class OrthogonalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = parametrizations.orthogonal(nn.Linear(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, batch):
        return self.head(torch.tanh(self.a(batch)))


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 7)
        self.out.weight = self.emb.weight

    def forward(self, batch):
        return self.out(torch.tanh(self.mix(self.emb(batch).mean(1))))


def data(name, gen, n):
    if name == "lstm":
        lens = torch.randint(1, T + 1, (n,), generator=gen)
        return (torch.randn(n, T, 3, generator=gen, dtype=DT), lens), 3
    if name == "encoder":
        lens = torch.randint(2, T + 1, (n,), generator=gen)
        pad = torch.arange(T)[None, :] >= lens[:, None]
        return (torch.randn(n, T, 4, generator=gen, dtype=DT), pad), 3
    if name == "orthogonal":
        return torch.randn(n, 4, generator=gen, dtype=DT), 3
    return torch.randint(0, 7, (n, 4), generator=gen), 7


NETS = {"lstm": LSTMNet, "encoder": EncoderNet, "orthogonal": OrthogonalNet, "tied": TiedNet}


def problem(name):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x, classes = data(name, gen, 6)
        batches.append((x, torch.randint(0, classes, (6,), generator=gen)))
    x, classes = data(name, gen, 8)
    return batches, (x, torch.randint(0, classes, (8,), generator=gen))


def make(name):
    torch.manual_seed(0)
    return NETS[name]().to(DT)


def train_loss(m, h, b):
    decay = sum(h["decay"][i] * (p**2).sum() for i, p in enumerate(m.parameters()))
    return nn.functional.cross_entropy(m(b[0]), b[1]) + 0.5 * decay


def val_loss(m, h, b):
    m.eval()  # the library puts the train flag back
    return nn.functional.cross_entropy(m(b[0]), b[1])


def hparams(name):
    n = len(list(make(name).parameters()))
    return {"decay": torch.full((n,), 1e-2, dtype=DT)}


def plain(name, h, batches, perturb_from=0, u=None, s=0.0):
    """Plain training; the hyperparameters move by ``s u`` from step ``perturb_from`` on."""
    model = make(name)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    torch.manual_seed(SEED)
    for i, batch in enumerate(batches):
        hh = h if u is None or i < perturb_from else {"decay": h["decay"] + s * u}
        opt.zero_grad()
        train_loss(model, hh, batch).backward()
        opt.step()
    return model


def central(name, h, batches, val, u, perturb_from):
    def run(s):
        model = plain(name, h, batches, perturb_from, u, s)
        return float(val_loss(model, h, val).detach())

    return (run(1e-5) - run(-1e-5)) / 2e-5


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("method", ["unrolled", "t1t2"])
def test_hypergradient_is_the_run_s_and_training_is_plain(name, method):
    batches, val = problem(name)
    h = hparams(name)
    u = torch.randn(h["decay"].shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    reference = plain(name, h, batches)
    rng = torch.get_rng_state()
    model = make(name)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": h["decay"].clone()},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=[val],  # one batch (a tuple of tensors would be sampled by rows)
        method=hg.Unrolled() if method == "unrolled" else hg.T1T2(),
        inner_steps=len(batches),
    )
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # the fused-kernel fallback
        for batch in batches:
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    got = float(hopt.history[-1].hypergrad["decay"] @ u)
    fd = central(name, h, batches, val, u, 0 if method == "unrolled" else len(batches) - 1)
    assert abs(got - fd) < 1e-7 * abs(fd) + 1e-10
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    mine, plain_state = model.state_dict(), reference.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in plain_state.items())
