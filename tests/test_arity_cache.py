"""check_arity remembers accepted (fn, n) pairs only: a refusal is never cached away."""

import functools
import gc

import pytest

from hypergradient._vocab import ArgumentTypeError
from hypergradient.methods._arity import _BINDS, check_arity


def test_accepted_count_is_remembered_other_counts_still_checked():
    def loss(p, h):
        return p

    check_arity(loss, 2, "inner_loss", "(params, hparams)", "")
    assert _BINDS[loss.__code__] == {2}
    with pytest.raises(ArgumentTypeError, match="3 arguments"):
        check_arity(loss, 3, "outer_loss", "(params, hparams, batch)", "")
    assert _BINDS[loss.__code__] == {2}


def test_closures_made_again_share_their_code_and_defaults_are_not_ignored():
    def make(scale):
        return lambda p, h: scale * p

    check_arity(make(1.0), 2, "inner_loss", "(params, hparams)", "")
    assert 2 in _BINDS[make(2.0).__code__]  # a new closure of the same lambda: no new read

    def with_default(p, h, batch=None):  # its defaults decide what binds: keyed by itself
        return p

    gc.collect()  # entries of earlier tests' functions held only by cycles go now, not below
    before = len(_BINDS)
    check_arity(with_default, 2, "inner_loss", "(params, hparams)", "")
    check_arity(with_default, 3, "inner_loss", "(params, hparams, batch)", "")
    assert _BINDS[with_default] == {2, 3}
    with_default.__defaults__ = None
    with pytest.raises(ArgumentTypeError, match="2 arguments"):
        check_arity(with_default, 2, "inner_loss", "(params, hparams)", "")
    del with_default
    gc.collect()
    assert len(_BINDS) == before


def test_unhashable_callables_and_partials_are_checked():
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, p):
            return p

    with pytest.raises(ArgumentTypeError):
        check_arity(Unhashable(), 2, "inner_loss", "(params, hparams)", "")
    check_arity(functools.partial(lambda a, p, h: p, 0), 2, "inner_loss", "(p, h)", "")
    with pytest.raises(ArgumentTypeError):
        check_arity(functools.partial(lambda a, p: p, 0), 2, "inner_loss", "(p, h)", "")
