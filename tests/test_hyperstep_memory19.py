"""A hyper-step's memory: what it keeps after it and what it holds while it runs.

* Older history records keep no parameter-sized tensor: their info drops its bulk tensors
  (an implicit method's ``solution``, a trajectory's ``params``), as their hyperparameters
  beyond ``SMALL`` elements were already dropped. Each record held one before: the heap
  grew by a parameter vector per hyper-step (100 of them with the default history).
* T1T2's step-gradient tap is dropped once the check has read it, so the gradients it kept
  are freed before the look-ahead runs; the look-ahead frees the outer gradient's leaves
  once ``x = lr * b`` holds them, before the mixed product. The hypergradients, infos and
  decisions are the same (the tap's loops: ``test_adv18_loops_t1t2_step_tap.py``).

On the MNIST-sized MLP of ``benchmarks/hyperstep_cost.py`` the three together took the
hyper-step's page faults from ~390-670 to 0-80 (fresh heap pages for the mixed product's
temporaries; ~13 us each on the benchmark machine's VM).
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

import hypergradient as hg
from hypergradient.hyperoptimizer import step_tap
from hypergradient.methods import t1t2 as t1t2_module

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
XV, YV = torch.randn(24, 12, generator=g), torch.randint(0, 3, (24,), generator=g)


def _hopt(method, history_size=None, inner_steps=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    sink = []

    def train_loss(m, h, b):
        penalty = 0.5 * (h["decay"] * next(m.parameters()) ** 2).sum()
        return F.cross_entropy(m(b[0]), b[1]) + penalty

    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((1, 1), 1e-2))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=train_loss,
        val_loss=lambda m, h, b: F.cross_entropy(m(b[0]), b[1]),
        val_data=(XV, YV),
        method=method,
        inner_steps=inner_steps,
        history_size=history_size,
        logger=sink.append,
    )
    return hopt, sink


def _run(hopt, steps):
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss((X, Y)).backward()
        hopt.step((X, Y))


@pytest.mark.filterwarnings("ignore::hypergradient.HypergradientWarning")  # (CG(3)'s residual)
@pytest.mark.parametrize(
    "make, field",
    [
        (hg.T1T2, "solution"),
        (lambda: hg.IFT(hg.CG(maxiter=3), damping=1.0), "solution"),
        (lambda: hg.Unrolled(), "params"),
    ],
)
def test_older_records_keep_no_parameter_sized_tensor(make, field):
    hopt, sink = _hopt(make())
    _run(hopt, 8)
    records = list(hopt.history)
    assert len(records) == 4 and [r.hyper_step for r in records] == [1, 2, 3, 4]
    assert getattr(records[-1].info, field) is not None  # the newest record: complete
    for old, logged in zip(records[:-1], sink[:-1]):
        assert getattr(old.info, field) is None  # fails on the old code (kept every one)
        # the logged record is the original, never modified (a rollback restores it)
        assert getattr(logged.info, field) is not None and old.info is not logged.info
        assert old.info.as_dict() == logged.info.as_dict()  # every plain field kept
        assert type(old.info) is type(logged.info)
    if field == "params":  # a trajectory's losses are numbers: kept
        assert records[0].info.inner_losses == sink[0].info.inner_losses
        assert len(records[0].info.inner_losses) > 0


def test_a_record_without_bulk_tensors_is_kept_as_it_is():
    from hypergradient.hyperoptimizer.history import HyperStepRecord

    info = hg.Info(method="m")
    record = HyperStepRecord(1, 1, 0.5, 1.0, 0.1, "m", info=info)
    assert record.lighter().info is info


def test_the_tap_and_the_outer_gradient_are_freed_before_the_mixed_product(monkeypatch):
    hopt, _ = _hopt(hg.T1T2(), inner_steps=2)
    seen: dict[str, list] = {"sent": [], "outer": [], "checked": []}
    tap_gradient, grads, hparams_first = (
        step_tap.Tap.gradient,
        t1t2_module._grads,
        t1t2_module.hparams_first,
    )

    def watched_tap(self, batch, leaves, loss):
        out = tap_gradient(self, batch, leaves, loss)
        seen["sent"] = [weakref.ref(t) for sent in self.sent for t in sent]
        seen["answered"] = out is not None
        return out

    def watched_grads(value, wrt, **kw):
        out = grads(value, wrt, **kw)
        if len(wrt) > 1:  # the outer gradient (params and the one hyperparameter leaf)
            seen["outer"] = [weakref.ref(t) for t in out[:-1] if t is not None]
        return out

    def watched_mixed(*args):
        seen["checked"].append(
            (
                [r() is None for r in seen["sent"]],
                [r() is None for r in seen["outer"]],
            )
        )
        return hparams_first(*args)

    monkeypatch.setattr(step_tap.Tap, "gradient", watched_tap)
    monkeypatch.setattr(t1t2_module, "_grads", watched_grads)
    monkeypatch.setattr(t1t2_module, "hparams_first", watched_mixed)
    _run(hopt, 6)
    assert hopt.hyper_steps == 3 and len(seen["checked"]) == 3
    assert seen["answered"]  # the check took the tap's gradient
    for sent_freed, outer_freed in seen["checked"]:
        assert sent_freed and all(sent_freed)  # the old code kept the tap to the step's end
        assert len(outer_freed) == 4 and all(outer_freed)  # and the outer gradient
    assert all(r.info.stats["mixed"] == "hparams" for r in hopt.history)
