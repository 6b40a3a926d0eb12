"""HyperOptimizer data given as a one-pass generator: the error says so, and changes nothing.

``val_data`` may be "an iterable of batches (cycled)"; a generator cannot be cycled, and once
spent the hyper-step raised "`val_data` yields no batches." after it had yielded them. The
message now names the cause and the fix. The failed step is undone (model, hyperparameters).
"""

from __future__ import annotations

import io
import itertools

import pytest
import torch

import hypergradient as hg


def _setup(val_data):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)

    def train_loss(m, hp, b):
        return ((m(b[0]) - b[1]) ** 2).mean() + hp["decay"].sum() * (m.weight**2).sum()

    def val_loss(m, hp, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.tensor(0.1, dtype=torch.float64))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=val_data(X, y),
        method=hg.T1T2(),
        inner_steps=1,
    )
    return hopt, model, (X, y)


def _step(hopt, batch):
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    hopt.step(batch)


def test_a_spent_generator_is_named_and_the_step_changes_nothing():
    hopt, model, batch = _setup(lambda X, y: ((X, y) for _ in range(2)))
    _step(hopt, batch)
    _step(hopt, batch)
    weights = [p.detach().clone() for p in model.parameters()]
    raw = [r.detach().clone() for r in hopt.raw_hparams()]
    with pytest.raises(ValueError, match=r"`val_data` is an iterator .* ran out after 2 batches"):
        _step(hopt, batch)
    assert hopt.hyper_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(raw, hopt.raw_hparams()))


@pytest.mark.parametrize(
    "data",
    [
        lambda X, y: [(X, y), (X, y)],  # re-iterable: cycled
        lambda X, y: itertools.cycle([(X, y)]),  # an endless iterator
    ],
)
def test_re_iterable_and_endless_data_keep_going(data):
    hopt, _, batch = _setup(data)
    for _ in range(4):
        _step(hopt, batch)
    assert hopt.hyper_steps == 4


def test_an_empty_iterable_still_says_it_yields_nothing():
    hopt, _, batch = _setup(lambda X, y: iter([]))  # (not sized: read at the first draw)
    with pytest.raises(ValueError, match="`val_data` yields no batches"):
        _step(hopt, batch)
    with pytest.raises(ValueError, match="`val_data` is an empty list"):  # sized: at once
        _setup(lambda X, y: [])


# ----------------------------------------------------------------------------- checkpoints
# A checkpoint stored the raw hyperparameters without their constraints: loading one saved
# with Positive(0.2) (raw log 0.2) into a hyper-optimizer whose hyperparameter is a plain
# tensor set it to -1.609 (a negative weight decay), into Interval(0, 10) to 1.667, silently.

CONSTRAINTS = {
    "exp": lambda: hg.Positive(torch.tensor(0.2, dtype=torch.float64)),
    "softplus": lambda: hg.Positive(torch.tensor(0.2, dtype=torch.float64), transform="softplus"),
    "interval_1": lambda: hg.Interval(torch.tensor(0.2, dtype=torch.float64), 0.0, 1.0),
    "interval_10": lambda: hg.Interval(torch.tensor(0.2, dtype=torch.float64), 0.0, 10.0),
    "tensor": lambda: torch.tensor(0.2, dtype=torch.float64),
}


def _hopt_with(constraint):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    return hg.HyperOptimizer(
        model,
        {"decay": constraint},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=lambda m, hp, b: ((m(b[0]) - b[1]) ** 2).mean() + hp["decay"] * m.weight.sum(),
        val_loss=lambda m, hp, b: ((m(b[0]) - b[1]) ** 2).mean(),
        val_data=(X, y),
        method=hg.T1T2(),
    )


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("saved", CONSTRAINTS)
@pytest.mark.parametrize("here", CONSTRAINTS)
def test_a_checkpoint_with_other_constraints_is_refused_and_changes_nothing(saved, here):
    state = _roundtrip(_hopt_with(CONSTRAINTS[saved]()).state_dict())
    hopt = _hopt_with(CONSTRAINTS[here]())
    raw = hopt.raw_hparams()[0].detach().clone()
    if saved == here:
        hopt.load_state_dict(state)
        assert float(hopt.hparams["decay"]) == pytest.approx(0.2, rel=1e-15)
        return
    with pytest.raises(ValueError, match=r"hparams\['decay'\] is .* in the checkpoint but"):
        hopt.load_state_dict(state)
    assert torch.equal(hopt.raw_hparams()[0], raw)


def test_a_checkpoint_without_the_constraints_entry_still_loads():
    """Checkpoints written before the entry existed carry no ``kinds``: not checked."""
    state = _roundtrip(_hopt_with(CONSTRAINTS["exp"]()).state_dict())
    del state["hparams"]["kinds"]
    hopt = _hopt_with(CONSTRAINTS["exp"]())
    hopt.load_state_dict(state)
    assert float(hopt.hparams["decay"]) == pytest.approx(0.2, rel=1e-15)


# ----------------------------------------------------------------------------- construction
# `holdout_batch_size`, `holdout_loss` and `patience` without `holdout_data` were refused, but
# `train_batch_size` without `train_data` and `min_delta` without `holdout_data` (even NaN) were
# silently ignored.


def _construct(**kw):
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    args = dict(
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=lambda m, hp, b: ((m(b[0]) - b[1]) ** 2).mean() + hp["decay"],
        val_loss=lambda m, hp, b: ((m(b[0]) - b[1]) ** 2).mean(),
        val_data=(X, y),
        method=hg.T1T2(),
    )
    args.update(kw)
    return hg.HyperOptimizer(model, {"decay": torch.tensor(0.1, dtype=torch.float64)}, **args)


def test_train_batch_size_without_train_data_is_refused():
    with pytest.raises(ValueError, match="`train_batch_size` needs `train_data`"):
        _construct(train_batch_size=4)


@pytest.mark.parametrize(
    "min_delta, match",
    [(0.01, "`min_delta` need `holdout_data`"), (float("nan"), "`min_delta` must be a finite")],
)
def test_min_delta_without_holdout_data_is_refused(min_delta, match):
    with pytest.raises(ValueError, match=match):
        _construct(min_delta=min_delta)


def test_keep_best_must_be_a_bool_even_without_holdout_data():
    with pytest.raises(TypeError, match="`keep_best` must be True or False"):
        _construct(keep_best="no")


def test_the_defaults_and_train_data_with_its_batch_size_construct():
    X = torch.randn(8, 3, dtype=torch.float64)
    hopt = _construct(train_data=(X, torch.zeros(8, 1, dtype=torch.float64)), train_batch_size=4)
    assert hopt.train_sampler is not None and hopt.train_sampler.batch_size == 4
    assert _construct(min_delta=0.0).guard is None


def test_a_batch_size_next_to_a_batch_sampler_is_refused_not_ignored():
    from hypergradient.hyperoptimizer.sampler import BatchSampler

    X = torch.randn(8, 3, dtype=torch.float64)
    data = BatchSampler((X, torch.zeros(8, 1, dtype=torch.float64)), 4)
    with pytest.raises(ValueError, match="`val_batch_size` would be ignored"):
        _construct(val_data=data, val_batch_size=2)
    assert _construct(val_data=data).val_sampler is data


def test_non_string_hparams_keys_are_refused():
    """Keys 1 and "1" became one hyperparameter (the other silently dropped)."""
    with pytest.raises(TypeError, match="`hparams` keys must be strings"):
        _construct_with({1: torch.tensor(0.1, dtype=torch.float64)})
    with pytest.raises(TypeError, match="got int 1"):
        _construct_with(
            {1: torch.tensor(0.1, dtype=torch.float64), "1": torch.tensor(0.2, dtype=torch.float64)}
        )


def _construct_with(hparams):
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    return hg.HyperOptimizer(
        model,
        hparams,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=lambda m, hp, b: m(b[0]).sum(),
        val_loss=lambda m, hp, b: m(b[0]).sum(),
        val_data=(X, torch.zeros(8, 1, dtype=torch.float64)),
        method=hg.T1T2(),
    )


def test_a_custom_constraint_round_trips_through_a_checkpoint():
    """The kinds hold plain settings only (a method named like one is not its repr)."""

    class Negative(hg.Constraint):
        def __init__(self, value):
            self._init_raw(-torch.as_tensor(value, dtype=torch.float64))

        def transform(self, raw):
            return -raw.exp()

        def inverse(self, value):
            return (-value).log()

        def high(self):  # a method, not a setting
            return 0.0

    state = _roundtrip(_hopt_with(Negative(0.2)).state_dict())
    assert state["hparams"]["kinds"] == {"decay": "Negative()"}
    hopt = _hopt_with(Negative(0.5))
    hopt.load_state_dict(state)
    assert float(hopt.hparams["decay"]) == pytest.approx(-0.2, rel=1e-15)
