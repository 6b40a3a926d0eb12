"""An ``nn.Embedding(sparse=True)`` under HyperOptimizer: refused with the sparse-gradient
error the implicit methods give, at the hyper-step, with the step rolled back.

Before: T1T2 raised ``RuntimeError: reshape is not implemented for sparse tensors`` (from
flattening the outer gradient), and a trajectory method's first inner step raised
``NotImplementedError: Could not run 'aten::amax' ... 'SparseCPU'`` from the window's note
of the gradients, after the optimizer had stepped (with ``inner_steps > 1`` nothing rolled
it back).
"""

import pytest
import torch

import hypergradient as hg

ce = torch.nn.functional.cross_entropy


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e = torch.nn.Embedding(20, 4, sparse=True)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, i):
        return self.out(self.e(i).mean(1))


def train_loss(m, h, batch):
    return ce(m(batch[0]), batch[1]) + 0.5 * (h["d"] * m.out.weight**2).sum()


def val_loss(m, h, batch):
    return ce(m(batch[0]), batch[1])


def _setup(method, inner_steps):
    torch.manual_seed(0)
    idx, y = torch.randint(0, 20, (24, 3)), torch.randint(0, 2, (24,))
    m = Bag()
    hopt = hg.HyperOptimizer(
        m,
        {"d": hg.Positive(torch.full((2, 4), 1e-2))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(idx, y),
        method=method,
        inner_steps=inner_steps,
    )
    batches = [(idx[8 * k : 8 * k + 8], y[8 * k : 8 * k + 8]) for k in range(3)]
    return m, hopt, batches


def _step(m, hopt, batch):
    hopt.zero_grad()
    train_loss(m, hopt.hparams, batch).backward()
    hopt.step(batch)


@pytest.mark.parametrize(
    "method, steps",
    [(hg.T1T2(), 1), (hg.T1T2(mixed="hparams"), 1), (hg.Unrolled(), 3), (hg.ForwardMode(), 3)],
)
def test_sparse_embedding_is_refused_at_the_hyper_step_and_rolled_back(method, steps):
    m, hopt, batches = _setup(method, steps)
    for batch in batches[: steps - 1]:
        _step(m, hopt, batch)  # steps without a hyper-step go through
    before = [p.detach().clone() for p in m.parameters()]
    raw = hopt.raw_hparams()[0].detach().clone()
    with pytest.raises(ValueError, match="sparse=False"):
        _step(m, hopt, batches[steps - 1])
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert torch.equal(raw, hopt.raw_hparams()[0])
    assert hopt.hyper_steps == 0
