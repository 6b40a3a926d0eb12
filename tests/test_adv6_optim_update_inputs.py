"""``FunctionalOptimizer.update`` checks its step count and its ``settings`` (adversarial probe,
round 6). Before: a step of -1 made Adam's bias correction ``1 - beta1^0`` zero
(``ZeroDivisionError``; with a tensor ``beta1``, silently infinite parameters), a float step
``'float' object is not subscriptable``, a bool step was read as 1, a step list shorter than
the parameters an ``IndexError``; a vector ``lr`` given to the update ``RuntimeError: shape
'[]' is invalid for input of size 2`` (also through ``hg.Unrolled`` with a trajectory
setting), a negative ``lr`` was silently gradient ascent and ``beta1=1.0`` a
``ZeroDivisionError``. The constructor refused all of these; the update now does too, and
the valid forms still give torch's numbers."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def _inputs(n: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [torch.full((3,), 1.0 + i, dtype=DT) for i in range(n)]
    grads = [torch.full((3,), 0.5 - i, dtype=DT) for i in range(n)]
    return params, grads


OPTS = {
    "sgd": lambda: hg.optim.sgd(0.1, 0.9),
    "adam": lambda: hg.optim.adam(0.1),
    "adam_tensor_beta": lambda: hg.optim.adam(0.1, (torch.tensor(0.9, dtype=DT), 0.999)),
}


@pytest.mark.parametrize("name", sorted(OPTS))
@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        (-1, ValueError, r"`step` counts the updates before this one and must be >= 0, got -1"),
        (1.5, TypeError, r"`step` must be an int .* got float 1.5"),
        (True, TypeError, r"got bool True"),
        ([0], ValueError, r"`step` has 1 counts for 2 params"),
        ([0, -2], ValueError, r"must be >= 0, got -2"),
    ],
)
def test_a_bad_step_count_is_refused_naming_it(name, step, error, match):
    opt = OPTS[name]()
    params, grads = _inputs()
    state = opt.init(params)
    with pytest.raises(error, match=match):
        opt.update(params, grads, state, step)


@pytest.mark.parametrize(
    ("make", "settings", "error", "match"),
    [
        (
            OPTS["sgd"],
            {"lr": torch.ones(2, dtype=DT)},
            TypeError,
            r"settings\['lr'\].*shape \(2,\)",
        ),
        (OPTS["sgd"], {"lr": torch.tensor(1)}, TypeError, r"floating-point scalar.*int64"),
        (OPTS["sgd"], {"lr": -1.0}, ValueError, r"settings\['lr'\]` must be a number >= 0"),
        (OPTS["sgd"], {"momentum": "0.9"}, TypeError, r"settings\['momentum'\]` must be a real"),
        (OPTS["adam"], {"beta1": 1.0}, ValueError, r"settings\['beta1'\]` must be .* < 1"),
        (
            OPTS["adam"],
            {"eps": float("nan")},
            ValueError,
            r"settings\['eps'\]` must be a finite number",
        ),
    ],
)
def test_bad_settings_given_to_the_update_are_refused_naming_them(make, settings, error, match):
    opt = make()
    params, grads = _inputs()
    with pytest.raises(error, match=match):
        opt.update(params, grads, opt.init(params), 0, settings)


def test_a_vector_trajectory_setting_is_named_by_unrolled():
    def f(p, h, batch=None):
        return ((p - 1.0) ** 2).sum()

    def g(p, h):
        return ((p - 0.3) ** 2).sum() + 0 * h["lr"].sum()

    p0, h = torch.zeros(3, dtype=DT), {"lr": torch.tensor([0.1, 0.2], dtype=DT)}
    traj = hg.methods.Trajectory(
        f, p0, hg.optim.sgd(0.1), [None] * 3, settings={"lr": lambda h: h["lr"]}
    )
    with pytest.raises(TypeError, match=r"settings\['lr'\]` must be a floating-point scalar"):
        hg.Unrolled()(hg.Problem(f, g, p0, h, trajectory=traj))


def test_valid_steps_and_settings_still_give_torchs_numbers():
    """int and per-parameter list steps, float and tensor settings: torch.optim.Adam's steps."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    u = torch.tensor([0.3, 0.7], dtype=DT, requires_grad=True)
    ref = torch.optim.Adam([w, u], lr=0.05, betas=(0.8, 0.99))
    opt = hg.optim.adam(0.3, (0.5, 0.9))  # replaced by the settings below
    ps = [w.detach().clone(), u.detach().clone()]
    state = opt.init(ps)
    lr, b1 = torch.tensor(0.05, dtype=DT), 0.8
    for t in range(6):
        ref.zero_grad()
        ((w**2).sum() * (1 + t) + (u**3).sum()).backward()
        ref.step()
        gs = [2 * ps[0] * (1 + t), 3 * ps[1] ** 2]
        step = t if t % 2 else [t, t]
        ps, state = opt.update(ps, gs, state, step, {"lr": lr, "beta1": b1, "beta2": 0.99})
    torch.testing.assert_close(ps[0], w.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ps[1], u.detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("n", [1, 3])
def test_a_twin_made_for_other_parameters_is_refused_naming_its_lists(n):
    """``from_torch``'s per-parameter lists (param groups, Adam's step offsets) must match the
    parameters stepped: 3 params gave ``IndexError``, 1 param took the first ones' groups."""
    w, c = torch.ones(3, dtype=DT, requires_grad=True), torch.ones(2, dtype=DT, requires_grad=True)
    sgd = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [c], "lr": 0.01}])
    adam = torch.optim.Adam([w, c], lr=0.1)
    w.grad = torch.ones_like(w)
    adam.step()  # c skipped: its count is one behind
    c.grad = torch.ones_like(c)
    adam.step()
    twin_sgd, _, _ = hg.optim.from_torch(sgd, [w, c])
    twin_adam, _, _ = hg.optim.from_torch(adam, [w, c])
    assert twin_sgd.group_of == [0, 1] and twin_adam.offsets == [0, -1]
    params = [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT), torch.ones(4, dtype=DT)][:n]
    for twin, attr in ((twin_sgd, "group_of"), (twin_adam, "offsets")):
        with pytest.raises(ValueError, match=rf"{n} params, but the optimizer's `{attr}` has an"):
            twin.update(params, [torch.ones_like(p) for p in params], twin.init(params), 1)
