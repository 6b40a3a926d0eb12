"""Adversarial review of ``hg.meta`` (round 8): ``IMAML(solver=hg.Exact(), vectorize=True)``.

Failed on the code before the review: a vectorized meta-batch is one stacked system of
``B x P`` unknowns. When that exceeded ``Exact``'s ``max_size`` (while each task's ``P``
did not), the call ran the whole adaptation and then raised "Exact() would materialize a
12 x 12 matrix" for a model of 4 parameters, with fixes that omit the one that works
here, ``vectorize=False``. Now it is refused before the adaptation, saying so.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient import meta

DT = torch.float64


def test_a_stack_too_large_for_exact_names_vectorize_false_before_adapting():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(3):
        x = torch.randn(6, 4, generator=g, dtype=DT)
        y = torch.sign(torch.randn(6, generator=g, dtype=DT))
        tasks.append(((x, y), (x + 0.1, y)))
    calls = []

    def loss(p, batch):
        calls.append(1)
        x, y = batch
        return torch.nn.functional.softplus(-y * (x @ p)).sum()

    theta, lam = torch.zeros(4, dtype=DT), 1.0

    def learner(vectorize):
        return meta.IMAML(
            loss, lam=lam, inner_steps=200, inner_lr=0.1, solver=hg.Exact(max_size=10),
            vectorize=vectorize,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"12 unknowns.*use vectorize=False \(one 4 x 4 solve"):
        learner(True).step(theta, tasks)
    assert len(calls) < 10  # refused before the 200 adaptation steps
    got, info = learner(False).step(theta, tasks)  # the fix it names, against dense solves
    assert info.status == hg.Status.EXACT
    refs = []
    for support, query in tasks:
        phi = meta.adapt(loss, theta, support, steps=200, lr=0.1, lam=lam)
        H = torch.func.hessian(lambda p, s=support: loss(p, s))(phi)
        b = torch.func.grad(lambda p, q=query: loss(p, q))(phi)
        refs.append(lam * torch.linalg.solve(H + lam * torch.eye(4, dtype=DT), b))
    ref = sum(refs) / len(refs)
    assert float((got - ref).abs().max()) < 1e-12 * float(ref.abs().max())
