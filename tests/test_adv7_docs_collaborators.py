"""docs/api/hyperoptimizer.md said each collaborator (ModelView, HyperParameters,
BatchSampler, TrajectoryWindow, History) "can be passed to its constructor in place of the
plain argument"; the constructor has no argument for a TrajectoryWindow or a History. The
page now names the three that can be passed; here they give the same run, number for
number, as the plain arguments, and ``hopt.history`` is the driver's own ``History``.
"""

from __future__ import annotations

import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import BatchSampler, History, HyperParameters, ModelView


def _run(collaborators: bool) -> tuple[torch.Tensor, hg.HyperOptimizer]:
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(m, h, batch):
        return ((m(batch[0]).squeeze(1) - batch[1]) ** 2).mean()

    def train_loss(m, h, batch):
        return loss(m, h, batch) + 0.5 * (h["decay"] * m.weight**2).sum()

    decay = hg.Positive(torch.full((1, 3), 0.1, dtype=torch.float64))
    hparams = {"decay": decay}
    val = (x[20:], y[20:])
    if collaborators:
        model_arg = ModelView(model, inner)
        hparams_arg = HyperParameters(hparams, device=torch.device("cpu"))
        val_arg = BatchSampler(val, 10, 0, "val_data")
    else:
        model_arg, hparams_arg, val_arg = model, hparams, val
    hopt = hg.HyperOptimizer(
        model_arg,
        hparams_arg,
        inner_optimizer=inner,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        train_loss=train_loss,
        val_loss=loss,
        val_data=val_arg,
        val_batch_size=None if collaborators else 10,
        method=hg.Unrolled(),
        inner_steps=3,
    )
    for i in range(9):
        batch = (x[2 * i : 2 * i + 10], y[2 * i : 2 * i + 10])
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    return hopt.hparams["decay"].clone(), hopt


def test_collaborators_in_place_of_plain_arguments_give_the_same_run():
    plain, h1 = _run(False)
    given, h2 = _run(True)
    assert len(h1.history) == len(h2.history) == 3
    assert not torch.equal(plain, torch.full_like(plain, 0.1))  # the decays moved
    torch.testing.assert_close(given, plain, rtol=0, atol=0)
    assert isinstance(h2.history, History)


def test_a_batch_size_of_at_least_the_rows_is_every_row():
    """Documented now: ``val_batch_size`` >= the rows of ``val_data`` takes all of them
    (the same hyperparameters as ``None``), and ``BatchSampler`` returns every row."""
    x, y = torch.randn(7, 3), torch.randn(7)
    sampler = BatchSampler((x, y), 100, 0, "val_data")
    bx, by = sampler.next()
    assert torch.equal(bx, x) and torch.equal(by, y)

    def run(size):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1).double()
        data = (torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64))

        def loss(m, h, b):
            return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean() + (h["d"] * m.weight**2).sum()

        hopt = hg.HyperOptimizer(
            model,
            {"d": hg.Positive(torch.full((1, 3), 0.1, dtype=torch.float64))},
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
            train_loss=loss,
            val_loss=loss,
            val_data=(data[0][20:], data[1][20:]),
            val_batch_size=size,
            method=hg.IFT(hg.CG(maxiter=20, tol=1e-12)),
            inner_steps=2,
        )
        for _ in range(4):
            batch = (data[0][:20], data[1][:20])
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
        return hopt.hparams["d"]

    everything = run(None)
    assert not torch.equal(everything, torch.full_like(everything, 0.1))
    torch.testing.assert_close(run(10), everything, rtol=0, atol=0)
    torch.testing.assert_close(run(1000), everything, rtol=0, atol=0)
