"""compat.hypergrad's solver, optimizers, utils and functorch modules (hypergrad 0.0.1's layout).

Checked against torch.optim, dense Hessians and the package's own exact hypergradients;
the whole layer is imported and run in a process where ``functorch`` cannot be imported.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError
from hypergradient.compat.hypergrad import approx_hypergrad, functorch, solver, utils
from hypergradient.compat.hypergrad.optimizers import diff_sgd

DT = torch.float64
_g = torch.Generator().manual_seed(2)
X = torch.randn(30, 4, generator=_g, dtype=DT)
Y = torch.randn(30, generator=_g, dtype=DT)


def inner_obj(in_params, out_params):
    (w,), (lam,) = in_params, out_params
    return 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (lam * w**2).sum()


def outer_obj(in_params, out_params):
    (w,) = in_params
    return ((X[:10] @ w - 1.0) ** 2).mean()


W = (torch.randn(4, generator=_g, dtype=DT),)
LAM = (torch.linspace(0.1, 0.4, 4, dtype=DT),)


def test_hvp_both_modes_equal_the_dense_hessian():
    H = torch.func.hessian(lambda w: inner_obj((w,), LAM))(W[0])
    v = (torch.arange(4.0, dtype=DT),)
    for rev_only in (False, True):
        (hv,) = utils.hvp(lambda p: inner_obj(p, LAM), W, v, rev_only=rev_only)
        assert torch.allclose(hv, H @ v[0], rtol=1e-12)


def test_vector_to_params_and_foreach_check_structure():
    with pytest.raises(ValueError, match="7 entries"):
        utils.vector_to_params(torch.zeros(6), (torch.zeros(3), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="same structure"):
        utils.foreach((torch.zeros(1),), (), torch.add)


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.9, "weight_decay": 1e-2},
        {"momentum": 0.9, "weight_decay": 0.0, "dampening": 0.3},
        {"momentum": 0.5, "weight_decay": 1e-3, "nesterov": True},
        {"momentum": 0.0, "weight_decay": 1e-2},
    ],
)
def test_diff_sgd_follows_torch_sgd_over_steps(kw):
    torch.manual_seed(0)
    params = [torch.randn(3, 2, dtype=DT), torch.randn(2, dtype=DT)]
    ref = [nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(ref, lr=0.1, **kw)
    state = None
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        params, state = diff_sgd(params, grads, state, lr=0.1, **kw)
        assert isinstance(params, tuple) and isinstance(state, tuple)
        for p, r in zip(params, ref):
            assert torch.allclose(p, r.detach(), rtol=1e-14), step
    if kw["momentum"] == 0:
        assert state == (None, None)


def test_diff_sgd_first_momentum_step_is_differentiable():
    g = torch.ones(3, dtype=DT, requires_grad=True)
    (p,), _ = diff_sgd((torch.zeros(3, dtype=DT),), (g,), None, 0.0, 0.9, 0.5)
    (dg,) = torch.autograd.grad(p.sum(), [g])  # hypergrad detached this buffer: no path
    assert torch.equal(dg, torch.full((3,), -0.5, dtype=DT))


def test_implicit_grad_decorator_with_an_exact_inverse():
    @approx_hypergrad.implicit_grad
    def exact_ihvp(inner_obj, outer_obj, in_params, out_params):
        H = torch.func.hessian(lambda w: inner_obj((w,), out_params))(in_params[0])
        g_in, g_out = torch.func.grad(outer_obj, argnums=(0, 1))(in_params, out_params)
        return (torch.linalg.solve(H, g_in[0]),), g_out

    got = exact_ihvp(inner_obj, outer_obj, W, LAM)
    ref = hg.implicit(inner_obj, outer_obj, W, LAM, hg.Exact())
    assert isinstance(got, tuple) and torch.allclose(got[0], ref[0], rtol=1e-10)
    got_kw = exact_ihvp(inner_obj=inner_obj, outer_obj=outer_obj, in_params=W, out_params=LAM)
    assert torch.equal(got_kw[0], got[0])


def test_make_functional():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    fmodel, params = functorch.make_functional(model, disable_autograd_tracking=True)
    assert all(not p.requires_grad for p in params)
    assert torch.equal(params[0], model[0].weight)  # copies, as functorch's (a deep copy)
    assert params[0].data_ptr() != model[0].weight.data_ptr()
    new = tuple(p + 1 for p in params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert torch.allclose(fmodel(new, X), model(X))
    with pytest.raises(ValueError, match="4 parameter tensors"):
        fmodel(new[:2], X)
    with pytest.raises(ArgumentTypeError, match="disable_autograd_tracking"):
        functorch.make_functional(model, "yes")


class Counting(solver.BaseSolver):
    """Records the batches each update sees."""

    def inner_forward(self, in_params, out_params, input, target):
        return self.inner_func(in_params, input).sum()

    def inner_update(self):
        self.seen.append(("inner", int(next(self.inner_loader)[0][0, 0])))

    def outer_forward(self, in_params, out_params, input, target):
        return self.inner_func(in_params, input).sum()

    def outer_update(self):
        self.seen.append(("outer", int(next(self.outer_loader)[0][0, 0])))


def _batches(values):
    return [(torch.full((1, 2), float(v)), torch.zeros(1)) for v in values]


def test_base_solver_schedule_and_loaders_continue():
    s = Counting(
        nn.Linear(2, 1),
        nn.Linear(1, 1),
        _batches([0, 1, 2]),
        _batches([7, 8]),
        num_iters=7,
        unroll_steps=3,
        inner_optimizer=None,
        outer_optimizer=None,
        device=torch.device("cpu"),
    )
    s.seen = []
    s.run()
    inner = [v for k, v in s.seen if k == "inner"]
    outer = [v for k, v in s.seen if k == "outer"]
    assert inner == [0, 1, 2, 0, 1, 2, 0]  # hypergrad restarted the loader: always 0
    assert outer == [7, 8]  # after inner updates i = 3 and 6
    assert (s.inner_step, s.outer_step) == (7, 2)


def test_base_solver_checks():
    common = dict(inner_optimizer=None, outer_optimizer=None, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="unroll_steps"):
        Counting(nn.Linear(2, 1), nn.Linear(1, 1), [], [], 3, 5, **common)
    with pytest.raises(ValueError, match="num_iters"):
        Counting(nn.Linear(2, 1), nn.Linear(1, 1), [], [], 0, 1, **common)
    s = Counting(nn.Linear(2, 1), nn.Linear(1, 1), [], [], 3, 1, **common)
    with pytest.raises(ValueError, match="inner_loader"):
        next(s.inner_loader)
    r = solver.Recorder()
    for v in (1.0, torch.tensor(3.0)):
        r.add("loss", v)
    assert r.flush() == {"loss": 2.0} and r.flush() == {}
    assert r.archive == {"loss": [1.0, 3.0]}
    loss, output = solver.ForwardOutput(torch.tensor(1.0), torch.zeros(2))
    assert float(loss) == 1.0 and output.shape == (2,)


def test_runs_without_functorch():
    """The compat modules and the ported example run where `import functorch` fails."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["functorch"] = None  # any `import functorch` now raises ImportError
        sys.path.insert(0, PORTS)
        import functools, torch
        from hypergradient.compat.hypergrad import approx_hypergrad, functorch, solver, utils
        import hypergrad_logistic_regression as ex
        class OuterSGD:  # plain SGD; torch.optim's first use imports torch._dynamo (slow)
            def __init__(self, params):
                self.params = list(params)
            def step(self):
                with torch.no_grad():
                    for p in self.params:
                        p -= p.grad
        torch.manual_seed(0)
        train, val = ex.generate_data(40, 3)
        model = torch.nn.Linear(3, 1, bias=False)
        hyper = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.ones_(hyper.weight)
        s = ex.Solver(model, hyper, [train], [val],
                      functools.partial(approx_hypergrad.conjugate_gradient, num_iters=3),
                      inner_optimizer=functools.partial(
                          ex.diff_sgd, momentum=0, weight_decay=0, lr=0.1),
                      outer_optimizer=OuterSGD(hyper.parameters()),
                      num_iters=5, unroll_steps=2, device=torch.device("cpu"))
        s.run()
        assert s.outer_step == 2, s.outer_step
        assert "functorch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        print("ok")
        """
    )
    code = f"PORTS = {str(Path(__file__).parent / 'compat_ports')!r}\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_conjugate_gradient_is_exact_in_n_iterations():
    exact = hg.implicit(inner_obj, outer_obj, W, LAM, hg.Exact())[0]
    got = approx_hypergrad.conjugate_gradient(inner_obj, outer_obj, W, LAM, 4, lr=0.1)[0]
    assert torch.allclose(got, exact, rtol=1e-10)
    partial = functools.partial(approx_hypergrad.nystrom, rank=4, rho=1e-12)
    assert torch.allclose(partial(inner_obj, outer_obj, W, LAM)[0], exact, rtol=1e-6)
