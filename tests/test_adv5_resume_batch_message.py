"""A trajectory method stepped without its batch while ``train_data`` is given: the error
must not suggest ``train_data=`` (which it already has and which cannot replace the batch)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import TRAIN, assert_same, batches, build, everything


@pytest.mark.parametrize("method", [hg.Unrolled(), hg.ForwardMode(), hg.DrMAD()])
def test_trajectory_step_without_batch_names_the_batch_not_train_data(method):
    model, hopt = build(method, train_data=TRAIN, train_batch_size=8)
    batch = batches(1)[0]
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    before = everything(model, hopt)
    with pytest.raises(ValueError, match="at every step") as err:
        hopt.step()
    assert "train_data= does not replace" in str(err.value)
    assert "or train_data=" not in str(err.value)
    assert_same(before, everything(model, hopt))


def test_implicit_step_without_batch_still_suggests_train_data():
    model, hopt = build()
    hopt.zero_grad()
    hopt.train_loss(batches(1)[0]).backward()
    hopt.step(batches(1)[0])
    hopt.step(batches(1)[0])
    with pytest.raises(ValueError, match="or train_data="):
        hopt.step()
    assert isinstance(hopt.loop.count, int) and torch.is_tensor(model[0].weight)
