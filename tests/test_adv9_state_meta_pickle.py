"""MAML and iMAML built on an ``nn.Module`` pickle (``torch.save(learner)``, multiprocessing),
and the copy goes on as the original, bit for bit (iMAML's solver state included).

The module's loss was a closure, which pickle refuses: ``AttributeError: Can't pickle local
object 'module_loss.<locals>.loss_fn'`` for the documented ``hg.meta.MAML(model, ...)``."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def _task(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DT)
    xs, xq = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 3, generator=g, dtype=DT)
    return (xs, xs @ w), (xq, xq @ w)


def _torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


LEARNERS = {
    "MAML": lambda m: hg.meta.MAML(m, inner_steps=2, inner_lr=0.1),
    "IMAML": lambda m: hg.meta.IMAML(
        m, lam=1.0, inner_steps=3, inner_lr=0.1, solver=hg.RecycledCG(maxiter=3)
    ),
}


@pytest.mark.parametrize("dump", [pickle.dumps, _torch_save], ids=["pickle", "torch.save"])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_meta_learner_on_a_module_pickles_and_continues_as_the_original(name, dump):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = model.double()
    params = hg.meta.parameters_of(model, copy=True)
    learner = LEARNERS[name](model)
    for i in range(2):  # iMAML's recycled subspace fills
        learner.step(params, [_task(i), _task(i + 10)])
    clone = pickle.loads(dump(learner)) if dump is pickle.dumps else dump(learner)
    for j in range(3):
        a, _ = learner.step(params, [_task(5 + j)])
        b, _ = clone.step(params, [_task(5 + j)])
        assert all(torch.equal(a[k], b[k]) for k in a)
