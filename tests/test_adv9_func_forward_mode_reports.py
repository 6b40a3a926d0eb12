"""Forward mode reports what Unrolled reports (adversarial round 9, functional API).

Before: a hyperparameter that entered the inner loss only in a term without the
parameters (a prior ``h ** 2``, or a term of detached parameters) got its exact zero
silently from ``hg.forward_mode`` while ``hg.unrolled``, ``hg.drmad`` and ``hg.implicit``
warned that it reaches the outer loss by no path; and ``hvp="auto"`` falling back to
``"double_math"`` on fused attention did so without the one warning its docstring promises
(Unrolled warns). Now both warn; the numbers are unchanged (checked against the loop).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64
T, LR = 3, 0.05

gen = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, generator=gen, dtype=DT)
Y = torch.randn(8, generator=gen, dtype=DT)
W0 = torch.randn(3, generator=gen, dtype=DT)


def inner_prior(w, h):  # "prior" is in no term with w: its hypergradient is exactly 0
    return ((X @ w - Y) ** 2).mean() + h["decay"] * (w**2).sum() + h["prior"] ** 2


def inner_detached(w, h):  # "prior" weighs a term of the detached parameters
    return (
        ((X @ w - Y) ** 2).mean() + h["decay"] * (w**2).sum() + h["prior"] * (w.detach() ** 2).sum()
    )


def outer(w, h):
    return ((X @ w - Y + 1.0) ** 2).mean()


def _loop(decay: float) -> float:
    w = W0.clone()
    for _ in range(T):
        leaf = w.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(((X @ leaf - Y) ** 2).mean() + decay * (leaf**2).sum(), leaf)
        w = w - LR * grad
    return float(outer(w, None))


@pytest.mark.parametrize("inner", [inner_prior, inner_detached], ids=["prior", "detached"])
@pytest.mark.parametrize("method", ["forward_mode", "unrolled"])
def test_a_hyperparameter_in_no_term_with_the_parameters_warns(method, inner):
    h = {"decay": torch.tensor(0.1, dtype=DT), "prior": torch.tensor(0.3, dtype=DT)}
    with pytest.warns(hg.HypergradientWarning, match="neither directly") as record:
        out, info = getattr(hg, method)(inner, outer, W0, h, T, hg.optim.sgd(LR), return_info=True)
    texts = [str(w.message) for w in record if "neither directly" in str(w.message)]
    assert len(texts) == 1 and texts[0].startswith("hparams['prior']")
    assert info.stats["unused_hparams"] == ["hparams['prior']"]
    assert float(out["prior"]) == 0.0
    eps = 1e-6
    fd = (_loop(0.1 + eps) - _loop(0.1 - eps)) / (2 * eps)
    assert float(out["decay"]) == pytest.approx(fd, rel=1e-7)


def test_forward_mode_does_not_warn_for_hyperparameters_in_terms_with_the_parameters():
    h = {"decay": torch.tensor(0.1, dtype=DT), "lr": torch.tensor(LR, dtype=DT)}

    def inner(w, hh):
        return ((X @ w - Y) ** 2).mean() + hh["decay"] * (w**2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        _, info = hg.forward_mode(inner, outer, W0, h, T, hg.optim.sgd(h["lr"]), return_info=True)
    assert "unused_hparams" not in info.stats


def _attention_problem():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    x = torch.randn(3, 5, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    p0 = {k: v.detach().clone() for k, v in mha.named_parameters()}

    def out(p):
        return functional_call(mha, p, (x, x, x), {"need_weights": False})[0]

    def inner(p, h):
        return (torch.tanh(out(p)) ** 2).mean() + h.exp() * sum((v**2).sum() for v in p.values())

    def outer_(p, h):
        return out(p).mean() ** 2

    return inner, outer_, p0


def test_forward_mode_warns_once_when_auto_falls_back_to_the_math_kernel():
    inner, outer_, p0 = _attention_problem()
    h = torch.tensor(-2.0, dtype=DT)
    opt = hg.optim.sgd(0.1)
    with pytest.warns(hg.HypergradientWarning) as record:
        fwd, info = hg.forward_mode(inner, outer_, p0, h, 2, opt, return_info=True)
    texts = [str(w.message) for w in record if "double_math" in str(w.message)]
    assert len(texts) == 1 and "Double backward is not available" in texts[0]
    assert info.stats["hvp"] == "double_math" and info.stats["hvp_fallback"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)  # asked for: no warning
        math = hg.forward_mode(inner, outer_, p0, h, 2, opt, hvp="double_math")
        rev = hg.unrolled(inner, outer_, p0, h, 2, opt, hvp="double_math")
    assert float(fwd) == pytest.approx(float(rev), rel=1e-10)
    assert float(math) == float(fwd)
