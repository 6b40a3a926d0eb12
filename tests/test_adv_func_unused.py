"""Trajectory methods warn about a hyperparameter no quantity depends on (as implicit does).

Adversarial review: a hyperparameter that reaches neither the inner loss, the outer loss
nor the optimizer's settings (typically a tensor the loss reads by reference, e.g. held by
a criterion, passed without ``hparams_by_reference=True``) got a silent zero from
``hg.unrolled``, ``hg.forward_mode`` and ``hg.drmad``, where ``hg.implicit`` warns. Now
they warn too (``info.stats["unused_hparams"]``), and only for such leaves.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
T = 4

g = torch.Generator().manual_seed(0)
X = torch.randn(12, 3, generator=g, dtype=DT)
Y = torch.randn(12, generator=g, dtype=DT)
W0 = torch.randn(3, generator=g, dtype=DT)
HIDDEN = torch.tensor(0.3, dtype=DT)  # what a criterion would hold: read by reference


def inner(w, h):
    return ((X @ w - Y) ** 2).mean() + h["decay"].exp() * (w**2).sum() + HIDDEN * w.sum()


def outer(w, h):
    return ((X @ w - Y + 1.0) ** 2).mean() + h["shift"] ** 2


def _loop(decay: float, lr: float) -> float:
    w = W0.clone()
    for _ in range(T):
        leaf = w.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(inner(leaf, {"decay": torch.tensor(decay, dtype=DT)}), leaf)
        w = w - lr * grad
    return float(outer(w, {"shift": torch.tensor(0.0, dtype=DT)}))


@pytest.mark.parametrize("method", ["unrolled", "forward_mode", "drmad"])
def test_a_hyperparameter_read_by_reference_warns_and_the_others_do_not(method):
    h = {
        "decay": torch.tensor(-1.0, dtype=DT),  # the inner loss
        "lr": torch.tensor(0.05, dtype=DT),  # the optimizer
        "shift": torch.tensor(0.5, dtype=DT),  # the outer loss only
        "hidden": HIDDEN,  # read by reference: no path from the argument
    }
    fn = getattr(hg, method)
    kwargs = {"anchors": T - 1} if method == "drmad" else {}  # drmad exact: every state kept
    with pytest.warns(hg.HypergradientWarning) as record:
        out, info = fn(inner, outer, W0, h, T, hg.optim.sgd(h["lr"]), return_info=True, **kwargs)
    texts = [str(w.message) for w in record if "neither directly" in str(w.message)]
    assert len(texts) == 1 and texts[0].startswith("hparams['hidden']")
    assert info.stats["unused_hparams"] == ["hparams['hidden']"]
    assert float(out["hidden"]) == 0.0
    eps = 1e-6
    fd_decay = (_loop(-1.0 + eps, 0.05) - _loop(-1.0 - eps, 0.05)) / (2 * eps)
    fd_lr = (_loop(-1.0, 0.05 + eps) - _loop(-1.0, 0.05 - eps)) / (2 * eps)
    assert float(out["decay"]) == pytest.approx(fd_decay, rel=1e-6)
    assert float(out["lr"]) == pytest.approx(fd_lr, rel=1e-6)
    assert float(out["shift"]) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("method", ["unrolled", "forward_mode", "drmad"])
def test_used_hyperparameters_do_not_warn_in_any_product_mode(method):
    h = {"decay": torch.tensor(-1.0, dtype=DT), "lr": torch.tensor(0.05, dtype=DT)}
    fn = getattr(hg, method)
    for hvp in ("double", "first_order"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            _, info = fn(
                inner, outer_no_shift, W0, h, T, hg.optim.sgd(h["lr"]), hvp=hvp, return_info=True
            )
        assert "unused_hparams" not in info.stats


def outer_no_shift(w, h):
    return ((X @ w - Y + 1.0) ** 2).mean()
