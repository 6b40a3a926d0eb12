"""HyperParameters.values: the built-in constraints transform the detached raw leaves (no
``torch.no_grad()`` block at every training step) and give what the transform under
``torch.no_grad()`` gives; another Constraint subclass still runs under ``torch.no_grad()``."""

from __future__ import annotations

import torch

import hypergradient as hg
from hypergradient.constraints import Constraint
from hypergradient.hyperoptimizer.hparams import HyperParameters

DT = torch.float64
CPU = torch.device("cpu")


def test_builtin_values_are_the_no_grad_transforms():
    plain = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    hp = HyperParameters(
        {
            "pos": hg.Positive(torch.tensor([0.1, 2.0], dtype=DT)),
            "soft": hg.Positive(torch.tensor(3.0, dtype=DT), transform="softplus"),
            "mix": hg.Interval(torch.tensor(0.25, dtype=DT), 0.0, 1.0),
            "plain": plain,
        },
        device=CPU,
    )
    assert hp._builtin
    values = hp.values()
    with torch.no_grad():
        expected = hp.transform(hp.raw)
    for k, v in values.items():
        assert not v.requires_grad and v.grad_fn is None
        assert torch.equal(v, expected[k])
    assert values["plain"].data_ptr() == plain.data_ptr()  # as raw.detach() before


class Scaled(Constraint):
    """A custom constraint with a learnable scale: its transform builds a graph."""

    def __init__(self, value: torch.Tensor):
        self.scale = torch.tensor(2.0, dtype=DT, requires_grad=True)
        self.grad_modes: list[bool] = []
        self.raw = value.clone().requires_grad_(True)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled())
        return raw * self.scale

    def inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value / 2.0


def test_a_custom_constraint_still_runs_under_no_grad():
    c = Scaled(torch.tensor([1.0, 3.0], dtype=DT))
    hp = HyperParameters({"s": c}, device=CPU)
    assert not hp._builtin
    c.grad_modes.clear()
    (value,) = hp.values().values()
    assert c.grad_modes == [False]
    assert not value.requires_grad and torch.equal(value, torch.tensor([2.0, 6.0], dtype=DT))
