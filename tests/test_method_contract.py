"""The method contract, run over every row of the registry (tests/registry.py).

Each method: matches its exact reference; resumes bit for bit from a state_dict saved with
torch.save and loaded with weights_only=True; a call that raises leaves its state (and its
solver's) unchanged, so the next call equals that of a twin that never failed; config and
repr are plain data; returns the hyperparameters' structure, detached.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

import hypergradient as hg
from registry import METHODS, rel


def _rows():
    return [pytest.param(row, id=row.id) for row in METHODS]


def _call(method, problem):
    out = method(problem)
    assert isinstance(out, tuple) and len(out) == 2
    return out


def _converged(row, problem_fn):
    """The method's result after ``row.calls`` calls (HOAG converges over calls)."""
    method = row.make()
    for _ in range(row.calls):
        out = _call(method, problem_fn())
    return out


def _same(a, b) -> bool:
    """Bit-for-bit equality of nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("row", _rows())
def test_matches_the_exact_reference(row):
    case = row.case()
    method = row.make()
    problem = case.problem()
    for _ in range(row.calls):
        out, info = _call(method, problem)
    assert rel(out, case.reference) < row.tol, (row.id, rel(out, case.reference))
    # the hyperparameters' structure, shapes, dtypes, device; detached
    got, gspec = hg._tree.flatten(out, "out")
    want, wspec = hg._tree.flatten(problem.hparams, "hparams")
    assert gspec.structure() == wspec.structure()
    for a, b in zip(got, want):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
        assert not a.requires_grad
    # one diagnostics shape
    assert isinstance(info, hg.Info) and info.method == method.name
    assert isinstance(info, hg.TrajectoryInfo if row.trajectory else hg.ImplicitInfo)
    at = info.params if row.trajectory else problem.params
    value = float(problem.outer_loss(at, problem.hparams))
    assert info.seconds > 0 and info.outer_loss == pytest.approx(value, rel=1e-12)
    json.dumps(info.as_dict())


@pytest.mark.parametrize("row", _rows())
def test_resume_from_a_state_dict_is_bit_for_bit(row):
    case = row.case()
    a = row.make()
    _call(a, case.problem())  # a first call: HOAG's warm start, the solver's generator
    saved = _roundtrip(a.state_dict())
    want = [_call(a, case.problem())[0] for _ in range(2)]
    b = row.make()
    b.load_state_dict(saved)
    got = [_call(b, case.problem())[0] for _ in range(2)]
    for x, y in zip(want, got):
        assert _same(x, y), row.id


class _Boom(torch.autograd.Function):
    """Identity whose backward raises: the call fails after the forward work (the solve)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in the backward pass")

    @staticmethod
    def jvp(ctx, tangent):
        raise RuntimeError("boom in the forward-mode pass")


def _exploding(losses):
    """The same losses, with a term 0 * <w, Boom(h)> whose derivative in h raises."""

    def make(*data):
        inner, outer = losses(*data)

        def bad_inner(w, h, *batch):
            leaf = next(iter(h.values())) if isinstance(h, dict) else h
            return inner(w, h, *batch) + 0.0 * (w * _Boom.apply(leaf).reshape(-1)[0]).sum()

        return bad_inner, outer

    return make


@pytest.mark.parametrize("row", _rows())
def test_a_failed_call_changes_nothing(row):
    from registry import linear_losses, ridge_losses, traj_losses

    case = row.case()
    base = linear_losses if "drmad" in row.id else traj_losses if row.trajectory else ridge_losses
    method, twin = row.make(), row.make()
    _call(method, case.problem())
    _call(twin, case.problem())
    before = _roundtrip(method.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        method(case.problem(make_inner=_exploding(base)))
    assert _same(method.state_dict(), before), row.id
    assert _same(_call(method, case.problem())[0], _call(twin, case.problem())[0]), row.id


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str))


@pytest.mark.parametrize("row", _rows())
def test_config_and_repr_are_plain_data(row):
    method = row.make()
    config = method.config()
    assert _plain(config) and json.loads(json.dumps(config)) == config
    assert row.make().config() == config  # a function of the settings only
    assert "0x" not in repr(method) and repr(method).startswith(type(method).__name__)
    assert type(method) in hg.METHODS.values()


@pytest.mark.parametrize("row", _rows())
def test_a_bad_checkpoint_is_refused_and_changes_nothing(row):
    case = row.case()
    method = row.make()
    _call(method, case.problem())
    before = _roundtrip(method.state_dict())
    for bad in ({"unexpected": 1}, {**before, "extra": 0}, [1, 2]):
        with pytest.raises(ValueError):
            method.load_state_dict(bad)
        assert _same(method.state_dict(), before)


@pytest.mark.parametrize("row", _rows())
def test_zero_size_hyperparameters_get_empty_hypergradients(row):
    """Every method alike (forward mode crashed where unrolled returned an empty result)."""
    case = row.case()
    h = case.hparams()
    if isinstance(h, dict):
        h = {**h, "none": torch.zeros(0, dtype=torch.float64)}
        ref, _ = _converged(row, case.problem)
        out, _ = _converged(row, lambda: case.problem(hparams=h))
        assert out["none"].shape == (0,)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    else:  # a tuple (h, empty): the loss reads h[0]
        out, _ = _converged(row, lambda: _with_empty_leaf(case))
        assert out[1].shape == (0,)
        assert rel(out[0], case.reference) < row.tol


def _with_empty_leaf(case):
    from registry import ridge_losses

    def losses(*data):
        inner, outer = ridge_losses(*data)
        return (lambda w, h: inner(w, h[0])), (lambda w, h: outer(w, h[0]))

    return case.problem(
        make_inner=losses, hparams=(case.hparams(), torch.zeros(0, dtype=torch.float64))
    )
