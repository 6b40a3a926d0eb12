"""Wrong types in trees raise ``ArgumentTypeError`` (a TypeError and a ValueError).

Adversarial review: ``_tree`` raised a plain ``TypeError`` for a Python number or an
integer tensor in ``params``/``hparams``, and ``hg.optim.from_torch`` for an optimizer
without a functional twin, so client code catching ``ValueError`` (the vocabulary's
promise for bad input) missed them. Each case below raises before any computation.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError

DT = torch.float64


def _f(p, h):
    return ((p - 1.0) ** 2).sum() * h.sum()


def _g(p, h):
    return p.sum()


BAD_HPARAMS = [
    (0.1, "hparams is a float"),
    ({"a": 1.0}, r"hparams\['a'\] is a float"),
    (torch.tensor(1), "hparams has dtype torch.int64"),
    ([torch.ones(1, dtype=DT), torch.ones(1, dtype=torch.int32)], r"hparams\[1\] has dtype"),
]


@pytest.mark.parametrize("hparams,match", BAD_HPARAMS)
def test_bad_hparams_types_are_argument_type_errors(hparams, match):
    p = torch.zeros(2, dtype=DT)
    calls = []

    def f(pp, hh):
        calls.append(1)
        return _f(pp, hh)

    for call in (
        lambda: hg.implicit(f, _g, p, hparams),
        lambda: hg.unrolled(f, _g, p, hparams, 2, hg.optim.sgd(0.1)),
        lambda: hg.forward_mode(f, _g, p, hparams, 2, hg.optim.sgd(0.1)),
    ):
        with pytest.raises(ArgumentTypeError, match=match) as caught:
            call()
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, TypeError)
    assert not calls


def test_bad_params_type_and_untwinned_optimizer():
    with pytest.raises(ValueError, match=r"params\['w'\]\[0\] is a float"):
        hg.implicit(_f, _g, {"w": [1.0]}, torch.ones(1, dtype=DT))
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="no functional twin"):
        hg.optim.from_torch(torch.optim.RMSprop([w]), [w])
    with pytest.raises(ValueError, match="maximize"):  # (amsgrad has a twin now)
        hg.optim.from_torch(torch.optim.Adam([w], maximize=True), [w])
