"""check_arity remembers accepted (fn, n) pairs only: a refusal is never cached away."""

import functools
import gc

import pytest

from hypergradient._vocab import ArgumentTypeError
from hypergradient.methods._checks import _BINDS, check_arity


def test_accepted_count_is_remembered_other_counts_still_checked():
    def loss(p, h):
        return p

    check_arity(loss, 2, "inner_loss", "(params, hparams)", "")
    assert _BINDS[loss] == {2}
    with pytest.raises(ArgumentTypeError, match="3 arguments"):
        check_arity(loss, 3, "outer_loss", "(params, hparams, batch)", "")
    assert _BINDS[loss] == {2}


def test_entries_die_with_the_function_and_unhashable_callables_are_checked():
    before = len(_BINDS)
    check_arity(lambda p, h: p, 2, "inner_loss", "(params, hparams)", "")
    gc.collect()
    assert len(_BINDS) == before

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, p):
            return p

    with pytest.raises(ArgumentTypeError):
        check_arity(Unhashable(), 2, "inner_loss", "(params, hparams)", "")
    check_arity(functools.partial(lambda a, p, h: p, 0), 2, "inner_loss", "(p, h)", "")
