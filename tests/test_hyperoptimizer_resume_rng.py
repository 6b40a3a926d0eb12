"""Resume with dropout: the checkpoint carries torch's random-number state, so a run resumed
in a fresh process (a different global generator state) continues bit for bit, without the
caller saving the generator separately (issue 9, defect family 3)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import DT, assert_same, batches, build, mlp, roundtrip, run

STEPS = batches(9)


def _final(model, hopt):
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "raw": [r.detach().clone() for r in hopt.raw_hparams()],
    }


def _resumed(method_factory, *, keep_rng: bool, cut: int = 4):
    model, hopt = build(method_factory(), model=mlp(dropout=0.3))
    run(hopt, STEPS[:cut])
    saved_model = roundtrip(model.state_dict())
    saved = roundtrip(hopt.state_dict())
    if not keep_rng:
        saved.pop("rng")
    torch.manual_seed(12345)  # a fresh process: another global generator state
    model2, hopt2 = build(method_factory(), model=mlp(dropout=0.3, seed=7))
    model2.load_state_dict(saved_model)
    hopt2.load_state_dict(saved)
    run(hopt2, STEPS[cut:])
    return _final(model2, hopt2)


def _uninterrupted(method_factory):
    model, hopt = build(method_factory(), model=mlp(dropout=0.3))
    run(hopt, STEPS)
    return _final(model, hopt)


@pytest.mark.parametrize(
    "method_factory",
    [lambda: hg.IFT(hg.CG(maxiter=5), damping=1.0), lambda: hg.Unrolled()],
    ids=["ift", "unrolled"],
)
def test_resume_with_dropout_is_bit_for_bit(method_factory):
    assert_same(_uninterrupted(method_factory), _resumed(method_factory, keep_rng=True))


def test_without_the_saved_random_state_the_dropout_masks_differ():
    # The control: the same resume without the checkpoint's generator state diverges, so the
    # test above would fail if the state were not restored.
    a = _uninterrupted(lambda: hg.IFT(hg.CG(maxiter=5), damping=1.0))
    b = _resumed(lambda: hg.IFT(hg.CG(maxiter=5), damping=1.0), keep_rng=False)
    assert not torch.equal(a["model"]["0.weight"], b["model"]["0.weight"])


def test_a_malformed_random_state_is_refused_and_changes_nothing():
    model, hopt = build(model=mlp(dropout=0.3))
    run(hopt, STEPS[:2])
    state = roundtrip(hopt.state_dict())
    state["rng"] = [torch.zeros(3, dtype=DT), None]
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="random-number state"):
        hopt.load_state_dict(state)
    assert torch.equal(before, torch.get_rng_state())
