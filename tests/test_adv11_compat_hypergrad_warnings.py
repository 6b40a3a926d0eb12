"""The compat ``approx_hypergrad`` functions warned in the core's vocabulary, at the core's
line: "hparams[1] influences the outer loss neither ... Check that inner_loss or outer_loss
uses it" (hypergradient/methods/implicit.py), for an ``out_params[1]`` the user's
``inner_obj``/``outer_obj`` do not read. The warning now names hypergrad's arguments and
points at the caller's line; the hypergradient is unchanged (exact zero for the unused one).
"""

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient, neumann, nystrom

D = torch.float64
torch.manual_seed(0)
X, Y = torch.randn(20, 3, dtype=D), torch.randn(20, dtype=D)
W = (torch.randn(3, dtype=D),)
LAM = (torch.full((3,), 0.1, dtype=D), torch.ones(2, dtype=D))  # the second is read by neither


def inner_obj(i, o):
    return 0.5 * ((X @ i[0] - Y) ** 2).mean() + 0.5 * (o[0] * i[0] ** 2).sum()


def outer_obj(i, o):
    return ((X @ i[0] - Y) ** 2).mean()


@pytest.mark.parametrize(
    "fn, kw",
    [
        (conjugate_gradient, dict(num_iters=3, lr=1.0)),
        (neumann, dict(num_iters=200, lr=0.5)),
        (nystrom, dict(rank=3, rho=1e-9)),
    ],
)
def test_unused_out_param_warns_in_hypergrad_terms_at_the_callers_line(fn, kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = fn(inner_obj, outer_obj, W, LAM, **kw)
    ours = [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    text = str(ours[0].message)
    assert "out_params[1]" in text and "inner_obj or outer_obj" in text
    assert "hparams[" not in text and "inner_loss" not in text
    assert ours[0].filename == __file__
    exact = hg.implicit(inner_obj, outer_obj, W, LAM[:1], hg.Exact(), stationarity=None)
    assert torch.allclose(h[0], exact[0], rtol=1e-8, atol=1e-12)
    assert torch.equal(h[1], torch.zeros(2, dtype=D))
