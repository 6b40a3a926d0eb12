"""``hg.optim.adam``'s flags are keyword-only (adversarial probe, round 6). Its fifth setting
was ``decoupled``, ``torch.optim.Adam``'s is ``amsgrad``: code ported positionally,
``adam(1e-3, (0.9, 0.999), 1e-8, 0.0, True)``, silently built AdamW where torch builds
AMSGrad (as ``sgd``'s settings after ``momentum`` became keyword-only before)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg


@pytest.mark.parametrize("make", [hg.optim.adam, hg.optim.Adam])
def test_the_flags_are_keyword_only_and_match_torchs_by_name(make):
    with pytest.raises(TypeError, match="positional"):
        make(1e-3, (0.9, 0.999), 1e-8, 0.0, True)
    ams = make(1e-3, (0.9, 0.999), 1e-8, 0.0, amsgrad=True)
    assert ams.amsgrad and not ams.decoupled and ams.buffers == 3
    w = make(1e-3, (0.9, 0.999), 1e-8, 0.1, decoupled=True)
    assert w.decoupled and not w.amsgrad
    ref = torch.optim.Adam(
        [torch.zeros(1, requires_grad=True)], 1e-3, (0.9, 0.999), 1e-8, 0.0, True
    )
    assert ref.param_groups[0]["amsgrad"] is True  # torch's fifth positional setting
