"""DrMAD warns when the optimizer's state, not only the parameters, leaves the straight line.

The path deviation looked at the parameters only. With Adam, or with the learning rate and
momentum tuned, the reverse recursion reads the interpolated momentum buffers and moments;
on an 8-feature logistic regression (30 steps) Adam with lr 0.1 and beta1 0.5 tuned gave a
hypergradient with cosine -0.04 and relative error 2800 against the exact (unrolled) one,
with a parameter-path deviation of 0.41 and no warning. The state's deviation there is 763;
every run of the calibration grid with a state deviation <= 3 had a cosine >= 0.99
(``drmad.MAX_STATE_DEVIATION``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
T = 30
_g = torch.Generator().manual_seed(0)
X = torch.randn(40, 8, generator=_g, dtype=DT)
Y = (torch.rand(40, generator=_g, dtype=DT) > 0.5).to(DT)
XV = torch.randn(20, 8, generator=_g, dtype=DT)
YV = (torch.rand(20, generator=_g, dtype=DT) > 0.5).to(DT)
BCE = torch.nn.functional.binary_cross_entropy_with_logits
W0 = torch.zeros(8, dtype=DT)


def inner(w, h, batch=None):
    return BCE(X @ w, Y) + h["wd"].exp() * (w**2).sum()


def outer(w, h):
    return BCE(XV @ w, YV)


def _case(kind: str, lr: float, beta: float, tune: bool):
    h = {"wd": torch.tensor(-3.0, dtype=DT)}
    if tune:
        h.update(lr=torch.tensor(lr, dtype=DT), beta=torch.tensor(beta, dtype=DT))
    lr_, beta_ = (h["lr"], h["beta"]) if tune else (lr, beta)
    if kind == "adam":
        return h, lambda: hg.optim.adam(lr_, betas=(beta_, 0.99))
    return h, lambda: hg.optim.sgd(lr_, momentum=beta_)


def _cosine(a, b, keys):
    u = torch.stack([a[k] for k in keys])
    v = torch.stack([b[k] for k in keys])
    return float(u @ v / (u.norm() * v.norm())), float((u - v).norm() / v.norm())


def _drmad(h, make, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, info = hg.drmad(inner, outer, W0, h, T, make(), return_info=True, **kw)
    texts = [str(r.message) for r in rec if issubclass(r.category, hg.HypergradientWarning)]
    return out, info, texts


@pytest.mark.parametrize(
    "kind, lr, beta, tune",
    [("adam", 0.1, 0.5, True), ("adam", 0.1, 0.5, False), ("sgd", 0.1, 0.9, True)],
)
def test_state_off_the_line_warns(kind, lr, beta, tune):
    h, make = _case(kind, lr, beta, tune)
    exact = hg.unrolled(inner, outer, W0, h, T, make())
    out, info, texts = _drmad(h, make)
    cos, err = _cosine(out, exact, list(h))
    assert cos < 0.8 or err > 0.6  # the answer is bad: cos -0.04 / err 1.7 / cos 0.78
    assert info.stats["path_deviation"] <= 1.0  # the parameters' check alone was silent
    assert info.stats["state_deviation"] > 5.0
    assert any("optimizer's stored states" in t for t in texts), texts
    # the knob the warning names fixes it: every state stored is exactly Unrolled
    out, _, texts = _drmad(h, make, anchors=T - 1)
    cos, err = _cosine(out, exact, list(h))
    assert err < 1e-10 and texts == []


@pytest.mark.parametrize("kind, tune", [("adam", True), ("sgd", True), ("sgd", False)])
def test_state_near_the_line_is_silent(kind, tune):
    h, make = _case(kind, 0.01, 0.9, tune)
    exact = hg.unrolled(inner, outer, W0, h, T, make())
    out, info, texts = _drmad(h, make)
    cos, _ = _cosine(out, exact, list(h))
    assert cos > 0.98 and texts == []
    assert info.stats["state_deviation"] < 3.0


def test_linear_update_does_not_read_the_state():
    # SGD with momentum and nothing of the optimizer tuned: the reverse recursion's
    # Jacobians do not depend on the buffer, so its deviation (8.3) is not a warning
    h, make = _case("sgd", 0.1, 0.9, False)
    _, info, texts = _drmad(h, make)
    assert info.stats["state_deviation"] > 5.0
    assert not any("optimizer's stored states" in t for t in texts)
