"""Optimizer settings through ``_vocab``, and SGD-HD / Adam-HD with non-finite hypergradients.

Issue 9, defect family 10: ``SGDHD``/``AdamHD`` accepted ``lr=True``, and one NaN gradient
left ``lr`` NaN forever. Every setting of the HD optimizers and of the functional optimizers
now goes through ``_vocab`` (``bool`` refused with ``ArgumentTypeError``, numpy scalars
accepted and normalized to Python floats), and a non-finite hypergradient of the learning
rate is not applied (the previous value is kept, with a ``HypergradientWarning``).
"""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError
from hypergradient.optim import SGDHD, AdamHD

DT = torch.float64


def quad_params() -> list[torch.Tensor]:
    return [torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)]


def set_grad_and_step(opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> None:
    p.grad = grad.clone()
    opt.step()


# ----------------------------------------------------------------------------- HD: types


@pytest.mark.parametrize(
    ("cls", "kw", "name"),
    [
        (SGDHD, {"lr": True}, "lr"),
        (SGDHD, {"hypergrad_lr": True}, "hypergrad_lr"),
        (SGDHD, {"momentum": True}, "momentum"),
        (SGDHD, {"dampening": False}, "dampening"),
        (SGDHD, {"weight_decay": True}, "weight_decay"),
        (SGDHD, {"lr": "0.1"}, "lr"),
        (SGDHD, {"momentum": 0.9, "nesterov": 1}, "nesterov"),
        (SGDHD, {"maximize": "yes"}, "maximize"),
        (AdamHD, {"lr": True}, "lr"),
        (AdamHD, {"hypergrad_lr": False}, "hypergrad_lr"),
        (AdamHD, {"eps": True}, "eps"),
        (AdamHD, {"weight_decay": True}, "weight_decay"),
        (AdamHD, {"betas": (True, 0.999)}, r"betas\[0\]"),
        (AdamHD, {"betas": (0.9, False)}, r"betas\[1\]"),
        (AdamHD, {"betas": 0.9}, "betas"),
        (AdamHD, {"betas": "ab"}, "betas"),
        (AdamHD, {"maximize": 0}, "maximize"),
    ],
)
def test_hd_refuses_bools_and_wrong_types_naming_the_setting(
    cls: type[torch.optim.Optimizer], kw: dict[str, object], name: str
) -> None:
    with pytest.raises(ArgumentTypeError, match=rf"^`{name}`"):
        cls(quad_params(), **kw)


@pytest.mark.parametrize(
    ("cls", "kw", "name"),
    [
        (SGDHD, {"lr": float("inf")}, "lr"),
        (SGDHD, {"hypergrad_lr": float("nan")}, "hypergrad_lr"),
        (SGDHD, {"momentum": -1e-3}, "momentum"),
        (AdamHD, {"eps": float("nan")}, "eps"),
        (AdamHD, {"betas": (0.9, np.float64(1.0))}, r"betas\[1\]"),
    ],
)
def test_hd_refuses_values_out_of_range(
    cls: type[torch.optim.Optimizer], kw: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=rf"^`{name}`") as caught:
        cls(quad_params(), **kw)
    assert not isinstance(caught.value, TypeError)  # a bad value, not a bad type


def test_add_param_group_refuses_a_bool_learning_rate_and_adds_nothing() -> None:
    p, q = quad_params()[0], quad_params()[0]
    for opt in (SGDHD([p], lr=0.1), AdamHD([p], lr=0.1)):
        with pytest.raises(ArgumentTypeError, match="^`lr`"):
            opt.add_param_group({"params": [q], "lr": True})
        assert len(opt.param_groups) == 1


def test_hd_accepts_numpy_scalars_as_python_floats_with_identical_steps() -> None:
    lr, mom, beta = np.float32(0.1), np.float64(0.5), np.float32(1e-3)
    pa, pb = quad_params(), quad_params()
    a = SGDHD(pa, lr=lr, momentum=mom, hypergrad_lr=beta, nesterov=True)
    b = SGDHD(pb, lr=float(lr), momentum=float(mom), hypergrad_lr=float(beta), nesterov=True)
    group = a.param_groups[0]
    assert all(type(group[k]) is float for k in ("lr", "momentum", "hypergrad_lr", "dampening"))
    assert type(group["nesterov"]) is bool
    for _ in range(5):
        for opt, p in ((a, pa[0]), (b, pb[0])):
            set_grad_and_step(opt, p, 2 * p.detach())
    assert torch.equal(pa[0], pb[0])
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"] != float(lr)  # it adapted
    adam = AdamHD(quad_params(), lr=np.float64(0.01), betas=(np.float32(0.8), np.float64(0.99)))
    assert adam.param_groups[0]["betas"] == (float(np.float32(0.8)), 0.99)


# ----------------------------------------------------------------------------- HD: non-finite


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_a_nan_gradient_keeps_the_learning_rate_and_warns(cls: type[torch.optim.Optimizer]) -> None:
    (p,) = params = quad_params()
    opt = cls(params, lr=0.1, hypergrad_lr=1e-2)
    set_grad_and_step(opt, p, torch.tensor([0.5, -1.0], dtype=DT))
    set_grad_and_step(opt, p, torch.tensor([0.3, -0.2], dtype=DT))
    lr = opt.param_groups[0]["lr"]
    assert lr != 0.1 and math.isfinite(lr)
    with pytest.warns(hg.HypergradientWarning, match="learning rate keeps its value"):
        set_grad_and_step(opt, p, torch.tensor([float("nan"), 1.0], dtype=DT))
    assert opt.param_groups[0]["lr"] == lr  # exactly the previous value, not NaN


def test_sgdhd_learning_rate_recovers_after_a_nan_gradient() -> None:
    """After the bad step the lr is frozen while the stored direction is NaN, then adapts."""
    beta, lr0 = 1e-2, 0.1
    (p,) = params = quad_params()
    opt = SGDHD(params, lr=lr0, hypergrad_lr=beta)
    set_grad_and_step(opt, p, torch.tensor([0.5, -1.0], dtype=DT))  # first step: lr unchanged
    with pytest.warns(hg.HypergradientWarning):
        set_grad_and_step(opt, p, torch.tensor([float("nan"), 1.0], dtype=DT))
    assert opt.param_groups[0]["lr"] == lr0
    with torch.no_grad():  # the user restores the parameters, as torch.optim.SGD would need
        p.copy_(torch.tensor([1.0, -2.0], dtype=DT))
    g3 = torch.tensor([0.2, 0.4], dtype=DT)
    with pytest.warns(hg.HypergradientWarning):  # h = -g3 . u2, u2 holds the NaN
        set_grad_and_step(opt, p, g3)
    assert opt.param_groups[0]["lr"] == lr0
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        g4 = torch.tensor([-0.1, 0.3], dtype=DT)
        set_grad_and_step(opt, p, g4)
    # alpha_4 = alpha_3 - beta h_4 with h_4 = -g4 . u3 and u3 = g3 (plain SGD)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 + beta * float(g4 @ g3), rel=1e-15)
    assert torch.isfinite(p).all()


def test_an_overflowing_hypergradient_step_is_not_applied() -> None:
    # beta * h = 1e300 * ~1e10 overflows to inf: the lr would become -inf or inf.
    p = torch.tensor([1e5], dtype=DT, requires_grad=True)
    opt = SGDHD([p], lr=0.1, hypergrad_lr=1e300)
    set_grad_and_step(opt, p, 2 * p.detach())
    with pytest.warns(hg.HypergradientWarning, match="not finite"):
        set_grad_and_step(opt, p, 2 * p.detach())
    assert opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(p.detach(), torch.tensor([1e5 - 0.1 * 2e5 - 0.1 * 2 * 8e4], dtype=DT))


# ----------------------------------------------------------------------------- functional


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: hg.optim.sgd(lr=True), "lr"),
        (lambda: hg.optim.sgd(lr=0.1, momentum=True), "momentum"),
        (lambda: hg.optim.sgd(lr=0.1, weight_decay=False), "weight_decay"),
        (lambda: hg.optim.sgd(lr=0.1, dampening=True), "dampening"),
        (lambda: hg.optim.sgd(lr=0.1, momentum=0.9, nesterov=1), "nesterov"),
        (lambda: hg.optim.sgd(lr="0.1"), "lr"),
        (lambda: hg.optim.sgd(lr=torch.tensor(1)), "lr"),
        (lambda: hg.optim.sgd(lr=torch.tensor([0.1, 0.2])), "lr"),
        (lambda: hg.optim.adam(lr=True), "lr"),
        (lambda: hg.optim.adam(betas=(True, 0.99)), r"betas\[0\]"),
        (lambda: hg.optim.adam(betas=0.9), "betas"),
        (lambda: hg.optim.adam(eps=True), "eps"),
    ],
)
def test_functional_optimizers_refuse_bools_and_wrong_types(factory, name: str) -> None:
    with pytest.raises(ArgumentTypeError, match=rf"^`{name}`"):
        factory()


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: hg.optim.sgd(lr=float("nan")), "lr"),
        (lambda: hg.optim.sgd(lr=-1e-3), "lr"),
        (lambda: hg.optim.sgd(lr=torch.tensor(-0.1)), "lr"),
        (lambda: hg.optim.adam(betas=(0.9, np.float32(1.0))), r"betas\[1\]"),
        (lambda: hg.optim.adam(eps=float("inf")), "eps"),
    ],
)
def test_functional_optimizers_refuse_values_out_of_range(factory, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^`{name}`"):
        factory()


def test_functional_optimizers_accept_numpy_scalars_and_keep_tensor_settings() -> None:
    a = hg.optim.sgd(lr=np.float32(0.1), momentum=np.float64(0.5), nesterov=True)
    b = hg.optim.sgd(lr=float(np.float32(0.1)), momentum=0.5, nesterov=True)
    assert all(type(v) is float for v in a.settings.values()) and a.nesterov is True
    params = [torch.tensor([1.0, -2.0], dtype=DT)]
    sa, sb = a.init(params), b.init(params)
    pa, pb = params, params
    for t in range(3):
        pa, sa = a.update(pa, [2 * x for x in pa], sa, t)
        pb, sb = b.update(pb, [2 * x for x in pb], sb, t)
    assert torch.equal(pa[0], pb[0])
    adam = hg.optim.adam(lr=np.float64(1e-2), betas=(np.float32(0.8), np.float64(0.99)))
    assert adam.settings["beta1"] == float(np.float32(0.8)) and adam.settings["beta2"] == 0.99
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)  # a hyperparameter: kept as it is
    assert hg.optim.sgd(lr=lr).settings["lr"] is lr


# ----------------------------------------------------------------------------- structure


OPTIM = Path(hg.__file__).parent / "optim"


def test_optim_imports_no_private_names_and_modules_stay_small() -> None:
    for path in sorted(OPTIM.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private = [n for n in private if n not in ("_tree", "_vocab")]  # modules
                assert not private, f"{path.name} imports private names {private}"
        assert len(path.read_text().splitlines()) < 400, path.name


# ------------------------------------------------- functional optimizers: structure of inputs
# Found by an adversarial probe: zip() dropped the parameters without a gradient (SGD returned
# one of two; Adam returned 2 state tensors where 4 are needed, so the next update read v as
# the second parameter's m), and an unknown setting name (torch's ``betas`` for Adam's
# ``beta1``/``beta2``, a typo) was ignored: a zero hypergradient.


@pytest.mark.parametrize(
    "opt", [hg.optim.sgd(0.1), hg.optim.sgd(0.1, momentum=0.9), hg.optim.adam(0.1)]
)
def test_functional_update_refuses_missing_grads_state_and_wrong_shapes(opt):
    params = [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT)]
    state = opt.init(params)
    assert len(state) == opt.buffers * 2
    grads = [torch.full((3,), 0.5, dtype=DT), torch.full((2,), 0.5, dtype=DT)]
    new, new_state = opt.update(params, grads, state, 0)
    assert len(new) == 2 and len(new_state) == len(state)
    with pytest.raises(ValueError, match=r"2 params need 2 grads"):
        opt.update(params, grads[:1], state, 0)
    if state:
        with pytest.raises(ValueError, match=r"state tensors"):
            opt.update(params, grads, state[:-1], 0)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(3,\), params\[1\] \(2,\)"):
        opt.update(params, [grads[0], grads[0]], state, 0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)


def test_unknown_setting_names_are_refused_naming_the_known_ones():
    adam = hg.optim.adam(0.1)
    params, grads = [torch.ones(2, dtype=DT)], [torch.ones(2, dtype=DT)]
    with pytest.raises(ValueError, match=r"'betas'.*'beta1', 'beta2'"):
        adam.update(params, grads, adam.init(params), 0, {"betas": (0.8, 0.9)})
    p0, h = {"w": torch.tensor([0.5, -1.0], dtype=DT)}, {"b1": torch.tensor(0.8, dtype=DT)}

    def f(p, h, batch=None):
        return ((p["w"] - 1.0) ** 2).sum()

    def g(p, h):
        return ((p["w"] - 0.3) ** 2).sum()

    traj = hg.methods.Trajectory(f, p0, adam, [None] * 3, settings={"beta": lambda h: h["b1"]})
    problem = hg.Problem(f, g, p0, h, trajectory=traj)
    with pytest.raises(ValueError, match=r"\['beta'\].*'beta1'"):
        hg.Unrolled()(problem)


def test_from_torch_refuses_a_parameter_the_optimizer_does_not_step():
    w, stray = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] is not a parameter of the optimizer"):
        hg.optim.from_torch(opt, [w, stray])
