"""``HyperOptimizer`` in loops users write: a step without ``backward()``, numpy columns as
data, batches of the user's own class holding a tensor computed with autograd, a dataset
that streams once.

- T1T2 differentiates the step ``theta - lr * grad``; ``hopt.step(batch)`` without a
  ``backward()`` took no step (the optimizer skips parameters without ``.grad``), and the
  hyper-step applied the hypergradient of the step that was not taken (the
  hyperparameters moved by 2.1e-5 while the weights stayed put). It is now refused before
  anything changes.
- ``val_data=(x_val.numpy(), y_val.numpy())`` was cycled as a sequence of two batches (the
  whole ``x_val`` first) and failed inside the user's loss at the first hyper-step ("too
  many values to unpack"); a tuple mixing tensors and other objects, or holding numpy
  arrays, is now refused at construction with the fix.
- A batch of the user's own class holding a non-leaf tensor crashed every trajectory step
  with torch's "Only Tensors created explicitly by the user ... support the deepcopy
  protocol"; its attributes are now copied one by one.
- A ``DataLoader`` over a dataset that streams once said "`val_data` yields no batches"
  after it had given some.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergradient as hg

GEN = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=GEN, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
XV = torch.randn(8, 3, generator=GEN, dtype=torch.float64)
YV = XV @ torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
LR, OUTER_LR = 0.1, 0.5


def train_loss(m, h, b):
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + 0.5 * (h["decay"] * m.weight[0] ** 2).sum()


def val_loss(m, h, b):
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def make(method, inner_steps=2, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.full((3,), 0.1, dtype=torch.float64)},
        inner_optimizer=inner,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=OUTER_LR),
        train_loss=kw.pop("train_loss", train_loss),
        val_loss=val_loss,
        val_data=kw.pop("val_data", (XV, YV)),
        method=method,
        inner_steps=inner_steps,
        **kw,
    )
    return model, inner, hopt


def batch(i):
    return X[4 * i : 4 * i + 4], Y[4 * i : 4 * i + 4]


# ---------------------------------------------------------------------- step without backward


def test_t1t2_step_without_backward_is_refused_before_anything_changes():
    model, inner, hopt = make(hg.T1T2())
    hopt.zero_grad()
    hopt.train_loss(batch(0)).backward()
    hopt.step(batch(0))
    weights, decay = model.weight.detach().clone(), hopt.hparams["decay"].clone()
    hopt.zero_grad()  # ... and no backward: the optimizer would take no step
    with pytest.raises(ValueError, match="no gradient on any trained parameter"):
        hopt.step(batch(1))
    assert torch.equal(model.weight, weights)
    assert torch.equal(hopt.hparams["decay"], decay)
    assert hopt.hyper_steps == 0 and hopt.loop.count == 1
    # the loop goes on as if the refused call never happened: the exact one-step hypergradient
    hopt.train_loss(batch(1)).backward()
    hopt.step(batch(1))
    w0 = weights[0]
    w1 = model.weight.detach()[0]
    assert torch.allclose(w1, w0 - LR * _grad(w0, 1, decay), atol=1e-15)
    wv = w1.clone().requires_grad_()
    gval = torch.autograd.grad(((XV @ wv - YV) ** 2).mean(), wv)[0]
    hypergrad = -LR * w0 * gval  # d/d decay_i of the step: -lr * w0_i * dg/dw1_i
    assert torch.allclose(hopt.hparams["decay"], decay - OUTER_LR * hypergrad, atol=1e-15)


def _grad(w0, i, decay):
    w = w0.clone().requires_grad_()
    x, y = batch(i)
    loss = ((x @ w - y) ** 2).mean() + 0.5 * (decay * w**2).sum()
    return torch.autograd.grad(loss, w)[0]


def test_a_step_without_backward_off_the_hyper_step_or_with_a_closure_is_a_plain_step():
    model, inner, hopt = make(hg.T1T2())
    weights = model.weight.detach().clone()
    hopt.zero_grad()
    hopt.step(batch(0))  # not due: as torch's optimizer, a step without gradients is a no-op
    assert torch.equal(model.weight, weights) and hopt.loop.count == 1

    def closure():
        hopt.zero_grad()
        loss = hopt.train_loss(batch(1))
        loss.backward()
        return loss

    hopt.zero_grad()
    hopt.step(batch(1), closure)  # due: the closure computes the gradients
    assert hopt.hyper_steps == 1


def test_other_methods_keep_stepping_without_backward():
    model, inner, hopt = make(hg.IFT(hg.CG(maxiter=5)), inner_steps=1)
    hopt.zero_grad()
    hopt.step(batch(0))  # IFT differentiates at the current weights, whatever the step was
    assert hopt.hyper_steps == 1


# ---------------------------------------------------------------------- data forms


@pytest.mark.parametrize("arg", ["val_data", "train_data", "holdout_data"])
def test_numpy_columns_are_refused_at_construction_naming_the_fix(arg):
    with pytest.raises(TypeError, match=rf"`{arg}` is a tuple of ndarray.*torch\.as_tensor"):
        make(hg.T1T2(), **{arg: (XV.numpy(), YV.numpy())})


def test_a_tuple_mixing_tensors_and_lists_is_refused():
    with pytest.raises(ValueError, match=r"`val_data` is a tuple of Tensor, list"):
        make(hg.T1T2(), val_data=(XV, YV.tolist()))


def test_lists_of_batches_and_tensor_columns_still_work():
    for data in [(XV, YV), [XV, YV], [(XV[:4], YV[:4]), (XV[4:], YV[4:])]]:
        model, inner, hopt = make(hg.T1T2(), inner_steps=1, val_data=data)
        hopt.zero_grad()
        hopt.train_loss(batch(0)).backward()
        hopt.step(batch(0))
        assert hopt.hyper_steps == 1


def test_a_dataset_that_streams_once_is_named_as_such():
    class OneShot(torch.utils.data.IterableDataset):
        used = False

        def __iter__(self):
            if self.used:
                return iter(())
            self.used = True
            return iter([(XV[i], YV[i]) for i in range(4)])

    loader = torch.utils.data.DataLoader(OneShot(), batch_size=2)
    model, inner, hopt = make(hg.T1T2(), inner_steps=1, val_data=loader)
    for i in range(2):
        hopt.zero_grad()
        hopt.train_loss(batch(i)).backward()
        hopt.step(batch(i))
    hopt.zero_grad()
    hopt.train_loss(batch(2)).backward()
    weights = model.weight.detach().clone()
    with pytest.raises(ValueError, match="gave 2 batches, then a new pass yielded none"):
        hopt.step(batch(2))
    assert torch.equal(model.weight, weights)


# ---------------------------------------------------------------------- user's batch class


class Batch:
    def __init__(self, x, y):
        self.x, self.y = x, y


def object_loss(m, h, b):
    return train_loss(m, h, (b.x, b.y))


@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode])
def test_a_batch_object_holding_a_tensor_computed_with_autograd_replays_exactly(method):
    results = []
    for grad in (False, True):
        model, inner, hopt = make(method(), train_loss=object_loss)
        scale = torch.ones(1, dtype=torch.float64, requires_grad=grad)
        for i in range(4):
            b = Batch(X[4 * i : 4 * i + 4] * scale, Y[4 * i : 4 * i + 4])  # non-leaf with grad
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
            b.x.data.zero_()  # the loop reuses the batch's memory: the replay has its copy
        assert hopt.hyper_steps == 2 and hopt.skipped == 0
        results.append(hopt.hparams["decay"])
    assert torch.equal(results[0], results[1])


def test_a_drop_last_loader_with_too_few_rows_is_named():
    data = torch.utils.data.TensorDataset(XV, YV)
    loader = torch.utils.data.DataLoader(data, batch_size=32, drop_last=True)
    model, inner, hopt = make(hg.T1T2(), inner_steps=1, val_data=loader)
    hopt.zero_grad()
    hopt.train_loss(batch(0)).backward()
    with pytest.raises(ValueError, match=r"yields no batches \(drop_last=True with fewer rows"):
        hopt.step(batch(0))


def test_a_list_of_bare_tensor_batches_of_uneven_sizes_says_how_it_was_read():
    batches = [XV[:3], XV[3:6], XV[6:]]  # list(DataLoader(x_val, batch_size=3))
    with pytest.raises(ValueError, match=r"read as columns: pass the DataLoader"):
        make(hg.T1T2(), val_data=batches)
