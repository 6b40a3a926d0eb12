"""DrMAD with anchors (exact at ``anchors >= T - 1``, better as they get closer) and its
path-deviation diagnostic (a warning where the straight-line assumption fails)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def logistic(seed=0, n=100, d=8):
    """8-feature logistic regression with one weight decay per feature."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = (X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = (Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)

    def inner(w, h):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)
        return bce + 0.5 * (h * w**2).sum()

    def outer(w, h):
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ w, yv)

    return inner, outer, torch.zeros(d, dtype=DT), torch.full((d,), 0.1, dtype=DT)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def quiet_drmad(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        return hg.drmad(*args, **kwargs)


@pytest.mark.parametrize(
    "opt",
    [
        hg.optim.sgd(lr=0.3, momentum=0.9),
        hg.optim.sgd(lr=0.2, momentum=0.5, nesterov=True),
        hg.optim.adam(lr=0.05),
    ],
    ids=["momentum", "nesterov", "adam"],
)
def test_anchors_at_every_step_reproduce_unrolled(opt):
    inner, outer, w0, h = logistic()
    exact = hg.unrolled(inner, outer, w0, h, 30, opt)
    for k in (29, 30, 100):  # every intermediate state stored (more is the same)
        got, info = quiet_drmad(inner, outer, w0, h, 30, opt, anchors=k, return_info=True)
        assert torch.allclose(got, exact, rtol=1e-12, atol=1e-15), k
        assert info.stats["anchors"] == 29 and info.stats["path_deviation"] == 0.0
        assert info.stored_states == 31


def test_momentum_near_the_edge_warns_and_anchors_fix_it():
    """Issue 10's case: SGD lr 0.3, momentum 0.9, 30 steps on an 8-feature logistic
    regression; plain DrMAD points the wrong way (cosine -0.96 here), warns, names
    ``anchors=``; the cosine rises with the anchors and the warning goes away."""
    inner, outer, w0, h = logistic()
    opt = hg.optim.sgd(lr=0.3, momentum=0.9)
    exact = hg.unrolled(inner, outer, w0, h, 30, opt)
    with pytest.warns(hg.HypergradientWarning, match="anchors=K"):
        plain, info = hg.drmad(inner, outer, w0, h, 30, opt, return_info=True)
    assert cos(plain, exact) < -0.5
    assert info.stats["path_deviation"] > 1.5  # measured 2.05
    cosines = {0: cos(plain, exact)}
    for k in (2, 5, 10, 30):
        got, info = quiet_drmad(inner, outer, w0, h, 30, opt, anchors=k, return_info=True)
        cosines[k] = cos(got, exact)
    assert cosines[5] > 0.95 and cosines[10] > 0.999 and cosines[30] > 1 - 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        hg.drmad(inner, outer, w0, h, 30, opt, anchors=10)  # deviation 0.10: no warning
    errors = [
        float((quiet_drmad(inner, outer, w0, h, 30, opt, anchors=k) - exact).norm())
        for k in (0, 5, 10, 29)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12 * float(exact.norm())


@pytest.mark.parametrize("lr, momentum", [(0.3, 0.0), (0.05, 0.9), (1.0, 0.0), (0.01, 0.9)])
def test_no_warning_where_the_straight_line_holds(lr, momentum):
    inner, outer, w0, h = logistic()
    opt = hg.optim.sgd(lr=lr, momentum=momentum)
    exact = hg.unrolled(inner, outer, w0, h, 30, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        got, info = hg.drmad(inner, outer, w0, h, 30, opt, return_info=True)
    assert cos(got, exact) > 0.99
    assert 0.0 <= info.stats["path_deviation"] < 0.1


def test_max_deviation_none_never_warns_and_the_diagnostic_is_still_reported():
    inner, outer, w0, h = logistic()
    opt = hg.optim.sgd(lr=0.3, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        _, info = hg.drmad(inner, outer, w0, h, 30, opt, max_deviation=None, return_info=True)
    assert info.stats["path_deviation"] > 1.5


def test_recorded_endpoint_equals_the_replay_for_plain_sgd():
    """``replay=False`` takes theta_T from ``trajectory.final_params``: with the real end of
    the same run it is DrMAD exactly, without the forward sweep."""
    inner, outer, w0, h = logistic()
    opt = hg.optim.sgd(lr=0.3)
    replayed, info = hg.drmad(inner, outer, w0, h, 30, opt, return_info=True)
    traj = hg.methods.Trajectory(lambda p, hh, b: inner(p, hh), w0, opt, [None] * 30)
    problem = hg.Problem(inner, outer, info.params, h, trajectory=traj)
    with pytest.raises(ValueError, match="final_params is None"):
        hg.DrMAD(replay=False)(problem)
    traj = hg.methods.Trajectory(
        lambda p, hh, b: inner(p, hh), w0, opt, [None] * 30, final_params=info.params
    )
    problem = hg.Problem(inner, outer, info.params, h, trajectory=traj)
    got, rinfo = hg.DrMAD(replay=False)(problem)
    assert torch.allclose(got, replayed, rtol=1e-13, atol=0)
    assert rinfo.inner_losses == [] and rinfo.stats["path_deviation"] is None
    momentum = hg.methods.Trajectory(
        lambda p, hh, b: inner(p, hh),
        w0,
        hg.optim.sgd(lr=0.3, momentum=0.9),
        [None] * 30,
        final_params=info.params,
    )
    with pytest.raises(ValueError, match="stateless optimizer"):
        hg.DrMAD(replay=False)(hg.Problem(inner, outer, info.params, h, trajectory=momentum))


def test_bad_arguments():
    with pytest.raises(ValueError, match="`anchors` must be an integer >= 0"):
        hg.DrMAD(anchors=-1)
    with pytest.raises(hg.ArgumentTypeError, match="`anchors`"):
        hg.DrMAD(anchors=2.5)
    with pytest.raises(ValueError, match="`max_deviation`"):
        hg.DrMAD(max_deviation=-0.1)
    with pytest.raises(ValueError, match="with replay=False there are none"):
        hg.DrMAD(anchors=3, replay=False)
    with pytest.raises(hg.ArgumentTypeError, match="`replay`"):
        hg.DrMAD(replay=1)
