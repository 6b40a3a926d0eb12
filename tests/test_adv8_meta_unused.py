"""Adversarial review of ``hg.meta`` (round 8): a meta-parameter the loss does not read.

Failed on the code before the review: second-order MAML passed ``hg.unrolled``'s warning
through as it was: "hparams['extra'] influences the outer loss neither directly nor
through the inner run ... Check that inner_loss, outer_loss or the optimizer's settings
use it through their `hparams` argument (a tensor read by reference needs
hparams_by_reference=True)", naming arguments MAML does not have, and pointing into
``hypergradient/meta/maml.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient import meta

DT = torch.float64


def loss(p, batch):
    x, y = batch
    return ((torch.tanh(x @ p["w"]) - y) ** 2).mean()


@pytest.mark.parametrize("vectorize", [False, True])
def test_an_unused_meta_parameter_is_named_in_meta_terms_at_the_callers_line(vectorize):
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(3, generator=g, dtype=DT), "extra": torch.ones(2, dtype=DT)}
    x, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    task = ((x, y), (x + 0.1, y))
    learner = meta.MAML(loss, inner_steps=2, inner_lr=0.3, vectorize=vectorize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad, _ = learner.step(theta, [task])
    (w,) = [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert w.filename == __file__, w.filename
    text = str(w.message)
    assert text.startswith("meta_params['extra'] is read by loss_fn on neither")
    assert "hparams" not in text and "inner_loss" not in text
    # the numbers: zero for the unused leaf, autograd through the two steps for the other
    assert torch.equal(grad["extra"], torch.zeros(2, dtype=DT))
    w0 = theta["w"].clone().requires_grad_(True)
    phi = w0
    for _ in range(2):
        (gs,) = torch.autograd.grad(loss({"w": phi}, task[0]), phi, create_graph=True)
        phi = phi - 0.3 * gs
    (ref,) = torch.autograd.grad(loss({"w": phi}, task[1]), w0)
    assert float((grad["w"] - ref).abs().max()) < 1e-14
