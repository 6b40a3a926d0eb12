"""The hyper-step's cheaper bookkeeping gives the numbers and effects the old one gave.

``_norms.host_floats`` reads 0-d CPU tensors one by one instead of stacking them (the
divergence watch, T1T2's look-ahead read, the implicit info's floor): the same floats,
bit for bit, as ``torch.stack([v.to(float64) ...]).tolist()``, signed zeros, subnormals,
NaN and infinities included, and None (the caller stacks) for anything else. The history's
record lightening drops each ``Info`` class's own bulk fields: a subclass with a bulk field
of its own loses it too, whichever class was lightened first (a per-class cache of those
fields, tried and dropped as no faster, failed this when keyed on one class). The outer
optimizer's gradients are cleared after its step without torch's profiler range, or by
its own ``zero_grad`` when it overrides it; the record's values are those the domain
check computed (``tests/test_holdout.py`` checks them after a ``keep_best`` restore).
"""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
import torch

import hypergradient as hg
from hypergradient._norms import host_floats
from hypergradient.hyperoptimizer import divergence
from hypergradient.hyperoptimizer.history import HyperStepRecord
from hypergradient.methods.implicit_info import ImplicitInfo

F32 = torch.finfo(torch.float32)
SPECIAL = [0.0, -0.0, 1.0 / 3.0, -2.5e-310, F32.tiny / 8, 3.0e38, math.inf, -math.inf, math.nan]


def _bits(xs: list[float]) -> list[bytes]:
    return [struct.pack("<d", x) for x in xs]


def _stacked(values: list[torch.Tensor]) -> list[float]:
    """The read the callers made before: stacked in float64, then one ``tolist``."""
    return torch.stack([v.to(torch.float64) for v in values]).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_host_floats_reads_the_stacked_numbers_bit_for_bit(dtype):
    values = [torch.tensor(x, dtype=dtype) for x in SPECIAL]
    values += [torch.tensor(x, dtype=torch.float64) for x in SPECIAL]  # mixed with float64
    read = host_floats(values)
    assert read is not None and all(type(x) is float for x in read)
    assert _bits(read) == _bits(_stacked(values))


@pytest.mark.parametrize(
    "odd",
    [
        torch.tensor([1.0]),  # not 0-d
        torch.tensor(3),  # an integer
        torch.tensor(True),  # a bool
        torch.tensor(1.0, device="meta"),  # not on the CPU
        torch.tensor(1.0 + 2.0j),  # complex
    ],
)
def test_host_floats_leaves_other_tensors_to_the_caller(odd):
    assert host_floats([torch.tensor(1.0), odd]) is None
    assert host_floats([odd, torch.tensor(1.0)]) is None
    assert host_floats([]) == []


def test_divergence_read_is_the_stacked_read():
    """Parameter norms in float64 then training losses in float32, as the watch records."""
    norms = [torch.tensor(x, dtype=torch.float64) for x in (1.0, 2.0 + 1e-12, 3.5)]
    losses = [torch.tensor(x, dtype=torch.float32) for x in (0.1, 1.0 / 3.0, F32.tiny / 4)]
    read = divergence._read([*norms, *losses])
    assert _bits(read) == _bits(_stacked([*norms, *losses]))
    assert read[3] != 0.1 and read[3] == float(torch.tensor(0.1, dtype=torch.float32))
    nan = [torch.tensor(math.nan), torch.tensor(1.0, dtype=torch.float64)]
    found = divergence.diagnose(nan[:1], nan[1:])
    assert found is not None and found[0] is False  # non-finite: still found


@dataclasses.dataclass
class _WithExtra(ImplicitInfo):
    """An info class with a bulk field of its own."""

    extra: torch.Tensor | None = dataclasses.field(default=None, repr=False)


@pytest.mark.parametrize("first", ["parent", "child"])
def test_lighter_drops_each_info_class_bulk_fields(first):
    def record(info):
        return HyperStepRecord(
            step=1,
            hyper_step=1,
            val_loss=0.0,
            hypergrad_norm=0.0,
            seconds=0.0,
            method="m",
            info=info,
        )

    parent = ImplicitInfo(solution=torch.ones(3))
    child = _WithExtra(solution=torch.ones(3), extra=torch.ones(4), stats={"k": 1})
    order = [parent, child] if first == "parent" else [child, parent]
    light = {id(info): record(info).lighter().info for info in order}
    assert light[id(parent)].solution is None
    assert light[id(child)].solution is None and light[id(child)].extra is None
    assert type(light[id(child)]) is _WithExtra and light[id(child)].stats == {"k": 1}
    assert child.extra is not None and child.solution is not None  # copies, not changed
    plain = ImplicitInfo()
    assert record(plain).lighter().info is plain  # nothing to drop: itself


class _CountingAdam(torch.optim.Adam):
    """An outer optimizer with a ``zero_grad`` of its own (which the driver must call)."""

    calls = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        type(self).calls += 1
        super().zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("outer", [torch.optim.Adam, _CountingAdam])
def test_outer_gradients_cleared_after_each_hyper_step(outer):
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32)
    model = torch.nn.Linear(5, 1)
    decay = hg.Positive(torch.full((1, 5), 0.1))

    def train_loss(m, h, b):
        return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean() + (h["decay"] * m.weight**2).sum()

    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: outer(hp, lr=0.01),
        train_loss=train_loss,
        val_loss=lambda m, h, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean(),
        val_data=(x, y),
        method=hg.T1T2(),
        inner_steps=2,
    )
    _CountingAdam.calls = 0
    before = decay.raw.detach().clone()
    for _ in range(4):
        hopt.zero_grad()
        hopt.train_loss((x, y)).backward()
        hopt.step((x, y))
        assert decay.raw.grad is None
    assert hopt.hyper_steps == 2 and not torch.equal(decay.raw, before)
    assert _CountingAdam.calls == (2 if outer is _CountingAdam else 0)
    assert torch.equal(hopt.history[-1].hparams["decay"], hopt.hparams["decay"])
