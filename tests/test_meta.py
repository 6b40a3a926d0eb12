"""Meta-learning wrappers against exact references.

iMAML: dense float64 closed forms ``(I + H / lam)^{-1} grad L_Q(phi*)`` with ``phi*`` solved
exactly (a linear solve for least squares, Newton for logistic regression) and central
finite differences of ``theta -> L_Q(phi*(theta))``. MAML: a hand-written
``create_graph=True`` implementation, a closed form for one step on a quadratic, and
central finite differences of the K-step loop itself.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from conftest import to_device
from hypergradient import meta

DT = torch.float64


def rel(a, b) -> float:
    fa = _flat(a)
    fb = _flat(b)
    return float((fa - fb).norm() / fb.norm())


def cpu(tree: dict) -> dict:
    return {k: v.cpu() for k, v in tree.items()}


def _flat(tree) -> torch.Tensor:
    if isinstance(tree, torch.Tensor):
        return tree.reshape(-1)
    if isinstance(tree, dict):
        return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])
    return torch.cat([t.reshape(-1) for t in tree])


def _unflat(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vec[i : i + n].reshape(like[k].shape)
        i += n
    return {k: out[k] for k in like}


# ----------------------------------------------------------------------------- data

GEN = torch.Generator().manual_seed(0)
D = 4


def regression_task(n_support: int = 12, n_query: int = 15):
    w = torch.randn(D, generator=GEN, dtype=DT)
    xs = torch.randn(n_support, D, generator=GEN, dtype=DT)
    xq = torch.randn(n_query, D, generator=GEN, dtype=DT)
    noise = 0.1
    ys = xs @ w + noise * torch.randn(n_support, generator=GEN, dtype=DT)
    yq = xq @ w + noise * torch.randn(n_query, generator=GEN, dtype=DT)
    return (xs, ys), (xq, yq)


TASKS = [regression_task() for _ in range(3)]
THETA = {
    "w": 0.5 * torch.randn(D, generator=GEN, dtype=DT),
    "b": torch.tensor(0.3, dtype=DT),
}


def lsq(params, batch):
    """Least squares ``1/2 mean (x w + b - y)^2``: a quadratic in (w, b)."""
    x, y = batch
    return 0.5 * ((x @ params["w"] + params["b"] - y) ** 2).mean()


def quadratic_form(batch):
    """``lsq(p) = 1/2 p^T A p - c^T p + const`` in the flat order (b, w) of ``_flat``."""
    x, y = batch
    Z = torch.cat([torch.ones(len(y), 1, dtype=DT), x], dim=1)  # columns: b, w
    return Z.T @ Z / len(y), Z.T @ y / len(y)


# ----------------------------------------------------------------------------- iMAML


def imaml_reference(theta: dict, task, lam: float):
    """phi* = (A + lam I)^{-1} (c + lam theta), meta-grad = (I + A / lam)^{-1} grad L_Q(phi*)."""
    (A, c), (Aq, cq) = quadratic_form(task[0]), quadratic_form(task[1])
    n = A.shape[0]
    t = _flat(theta)
    phi = torch.linalg.solve(A + lam * torch.eye(n, dtype=DT), c + lam * t)
    grad_q = Aq @ phi - cq
    return torch.linalg.solve(torch.eye(n, dtype=DT) + A / lam, grad_q), phi


def imaml_objective(theta_flat: torch.Tensor, task, lam: float) -> torch.Tensor:
    """theta -> L_Q(phi*(theta)), with phi* solved exactly."""
    _, phi = imaml_reference(_unflat(theta_flat, THETA), task, lam)
    return lsq(_unflat(phi, THETA), task[1])


def central_fd(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = eps
        out[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return out


@pytest.mark.parametrize("solver", [hg.CG(maxiter=50, tol=1e-13), hg.Exact()], ids=["cg", "exact"])
def test_imaml_matches_dense_closed_form_and_finite_differences(solver):
    lam = 0.7
    task = TASKS[0]
    # gradient descent on L_S + lam/2 ||phi - theta||^2 with step 1 / (lambda_max + lam)
    step = 1.0 / (float(torch.linalg.eigvalsh(quadratic_form(task[0])[0])[-1]) + lam)
    im = meta.IMAML(lsq, lam=lam, inner_steps=100, inner_lr=step, solver=solver)
    grad, info = im.meta_gradient(THETA, task)
    ref, phi = imaml_reference(THETA, task, lam)
    assert set(grad) == {"w", "b"} and grad["b"].shape == () and grad["w"].dtype == DT
    assert info.inner_grad_norm < 1e-12
    assert rel(im.adapt(THETA, task[0]), phi) < 1e-12
    assert rel(grad, ref) < 1e-10
    fd = central_fd(lambda t: imaml_objective(t, task, lam), _flat(THETA))
    assert rel(grad, fd) < 1e-7
    assert info.query_loss == pytest.approx(float(lsq(_unflat(phi, THETA), task[1])), rel=1e-12)
    assert info.support_loss_after < info.support_loss_before


def test_imaml_meta_gradient_is_not_the_plain_gradient_at_phi():
    # (I + H/lam)^{-1} differs from the first-order approximation grad L_Q(phi*): the test
    # above would not pass with a meta-gradient that forgot the inverse.
    lam = 0.3
    ref, phi = imaml_reference(THETA, TASKS[1], lam)
    Aq, cq = quadratic_form(TASKS[1][1])
    assert rel(Aq @ phi - cq, ref) > 0.1
    step = 1.0 / (float(torch.linalg.eigvalsh(quadratic_form(TASKS[1][0])[0])[-1]) + lam)
    im = meta.IMAML(lsq, lam=lam, inner_steps=250, inner_lr=step, solver=hg.CG(50, 1e-13))
    assert rel(im.meta_gradient(THETA, TASKS[1])[0], ref) < 1e-9


def test_imaml_step_is_the_mean_over_tasks_and_vectorized_agrees(device):
    lam = 1.5
    kwargs = dict(lam=lam, inner_steps=100, inner_lr=0.2, solver=hg.CG(maxiter=60, tol=1e-13))
    ref = torch.stack([imaml_reference(THETA, t, lam)[0] for t in TASKS]).mean(0)  # CPU
    theta, tasks = to_device(device, (THETA, TASKS))
    grad, info = meta.imaml_step(lsq, theta, tasks, **kwargs)
    assert all(v.device == theta["w"].device for v in grad.values())
    assert rel(cpu(grad), ref) < 1e-10
    assert info.method == "imaml" and len(info.tasks) == 3 and not info.vectorized
    assert info.converged and info.relative_residual < 1e-12 and info.num_hvps > 0
    vgrad, vinfo = meta.imaml_step(lsq, theta, tasks, vectorize=True, **kwargs)
    assert vinfo.vectorized and vinfo.converged
    assert rel(cpu(vgrad), ref) < 1e-10
    for a, b in zip(info.tasks, vinfo.tasks):
        assert a.query_loss == pytest.approx(b.query_loss, rel=1e-10)
        assert a.support_loss_before == pytest.approx(b.support_loss_before, rel=1e-12)
        assert b.inner_grad_norm < 1e-10


def test_imaml_with_damping_solves_the_damped_system():
    lam, d = 0.8, 0.5
    task = TASKS[2]
    A = quadratic_form(task[0])[0]
    im = meta.IMAML(lsq, lam=lam, inner_steps=150, inner_lr=0.2, solver=hg.Exact(), damping=d)
    grad, _ = im.meta_gradient(THETA, task)
    _, phi = imaml_reference(THETA, task, lam)
    Aq, cq = quadratic_form(task[1])
    n = A.shape[0]
    ref = lam * torch.linalg.solve(A + (lam + d) * torch.eye(n, dtype=DT), Aq @ phi - cq)
    assert rel(grad, ref) < 1e-10


def logistic_task(n: int = 30):
    w = torch.randn(D, generator=GEN, dtype=DT)
    x = torch.randn(2 * n, D, generator=GEN, dtype=DT)
    y = (torch.rand(2 * n, generator=GEN, dtype=DT) < torch.sigmoid(2 * x @ w)).to(DT)
    return (x[:n], y[:n, None]), (x[n:], y[n:, None])


def test_imaml_with_a_module_on_a_non_quadratic_loss():
    """nn.Module + criterion path; logistic regression, phi* by Newton, analytic Hessian."""
    torch.manual_seed(0)
    model = nn.Linear(D, 1).double()
    crit = nn.functional.binary_cross_entropy_with_logits
    theta = meta.parameters_of(model)
    support, query = logistic_task()
    lam = 0.2

    def design(batch):  # columns in the flat order of _flat: bias, weight
        x, y = batch
        return torch.cat([torch.ones(len(x), 1, dtype=DT), x], dim=1), y[:, 0]

    def grad_hess(phi, batch):
        Z, y = design(batch)
        s = torch.sigmoid(Z @ phi)
        return Z.T @ (s - y) / len(y), Z.T @ (Z * (s * (1 - s))[:, None]) / len(y)

    def phi_star(t):
        phi = t.clone()
        for _ in range(50):
            g, H = grad_hess(phi, support)
            g = g + lam * (phi - t)
            if g.norm() < 1e-14:
                break
            phi = phi - torch.linalg.solve(H + lam * torch.eye(len(t), dtype=DT), g)
        return phi

    def query_loss(phi):
        Z, y = design(query)
        return crit(Z @ phi, y)

    t = _flat(theta)
    phi = phi_star(t)
    H = grad_hess(phi, support)[1]
    gq = grad_hess(phi, query)[0]
    ref = torch.linalg.solve(torch.eye(len(t), dtype=DT) + H / lam, gq)

    kwargs = dict(lam=lam, inner_steps=200, inner_lr=1.0, criterion=crit)
    grad, info = meta.IMAML(model, **kwargs).meta_gradient(theta, (support, query))
    assert info.inner_grad_norm < 1e-10 and info.converged
    assert rel(grad, ref) < 1e-6  # CG's default tolerance is 1e-6
    exact, _ = meta.IMAML(model, solver=hg.Exact(), **kwargs).meta_gradient(theta, (support, query))
    assert rel(exact, ref) < 1e-10
    fd = central_fd(lambda v: query_loss(phi_star(v)), t)
    assert rel(exact, fd) < 1e-7
    # the module's own parameters are untouched and unused
    assert torch.equal(model.weight.detach(), theta["weight"])


def test_imaml_with_another_inner_optimizer():
    # The inner solver does not matter as long as it reaches the minimizer: heavy ball.
    lam = 1.0
    task = TASKS[1]
    im = meta.IMAML(
        lsq,
        lam=lam,
        inner_steps=150,
        inner_optimizer=hg.optim.sgd(lr=0.2, momentum=0.5),
        solver=hg.CG(maxiter=50, tol=1e-12),
    )
    grad, info = im.meta_gradient(THETA, task)
    assert info.inner_grad_norm < 1e-12
    assert rel(grad, imaml_reference(THETA, task, lam)[0]) < 1e-10
    # ... and a budget too small to reach it shows in the diagnostics and the result
    im.inner_steps = 3
    grad, info = im.meta_gradient(THETA, task)
    assert info.inner_grad_norm > 1e-3
    assert rel(grad, imaml_reference(THETA, task, lam)[0]) > 1e-4


# ----------------------------------------------------------------------------- MAML

torch.manual_seed(1)
MLP = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
MLP = MLP.double()
MLP_THETA = meta.parameters_of(MLP)


def sine_task(seed: int, k: int = 10):
    g = torch.Generator().manual_seed(seed)
    amp = 0.5 + 2 * torch.rand((), generator=g, dtype=DT)
    phase = 3 * torch.rand((), generator=g, dtype=DT)
    x = 10 * torch.rand(2 * k, 1, generator=g, dtype=DT) - 5
    y = amp * torch.sin(x + phase)
    return (x[:k], y[:k]), (x[k:], y[k:])


SINE_TASKS = [sine_task(s) for s in range(3)]


def mlp_loss(params, batch):
    x, y = batch
    return ((functional_call(MLP, params, (x,)) - y) ** 2).mean()


def maml_by_hand(theta, task, steps, lr, create_graph=True):
    """Textbook MAML with autograd: K SGD steps kept in the graph, then backprop to theta."""
    t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    p = t
    for _ in range(steps):
        g = torch.autograd.grad(mlp_loss(p, task[0]), list(p.values()), create_graph=create_graph)
        p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
    if create_graph:
        grads = torch.autograd.grad(mlp_loss(p, task[1]), list(t.values()))
    else:
        p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        grads = torch.autograd.grad(mlp_loss(p, task[1]), list(p.values()))
    return dict(zip(theta, grads))


def k_step_loss(theta_flat, task, steps, lr):
    """theta -> L_Q(phi_K) by a plain loop (no derivatives kept): for finite differences."""
    p = _unflat(theta_flat, MLP_THETA)
    for _ in range(steps):
        p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        g = torch.autograd.grad(mlp_loss(p, task[0]), list(p.values()))
        p = {k: v.detach() - lr * gk for (k, v), gk in zip(p.items(), g)}
    return mlp_loss(p, task[1])


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_matches_autograd_and_finite_differences(steps):
    lr = 0.05
    task = SINE_TASKS[0]
    grad, info = meta.MAML(MLP, inner_steps=steps, inner_lr=lr).meta_gradient(MLP_THETA, task)
    ref = maml_by_hand(MLP_THETA, task, steps, lr)
    assert list(grad) == list(MLP_THETA)
    assert rel(grad, ref) < 1e-12
    fd = central_fd(lambda t: k_step_loss(t, task, steps, lr), _flat(MLP_THETA))
    assert rel(grad, fd) < 1e-7
    assert info.query_loss == pytest.approx(float(k_step_loss(_flat(MLP_THETA), task, steps, lr)))
    assert info.status == "unrolled"


def test_maml_one_step_closed_form_on_a_quadratic():
    """(I - alpha A_S) grad L_Q(theta - alpha grad L_S(theta)) for least squares."""
    lr = 0.1
    task = TASKS[0]
    (A, c), (Aq, cq) = quadratic_form(task[0]), quadratic_form(task[1])
    t = _flat(THETA)
    phi = t - lr * (A @ t - c)
    ref = (torch.eye(len(t), dtype=DT) - lr * A) @ (Aq @ phi - cq)
    grad, _ = meta.MAML(lsq, inner_steps=1, inner_lr=lr).meta_gradient(THETA, task)
    assert rel(grad, ref) < 1e-13
    fo, _ = meta.MAML(lsq, inner_steps=1, inner_lr=lr, first_order=True).meta_gradient(THETA, task)
    assert rel(fo, Aq @ phi - cq) < 1e-13
    assert rel(fo, ref) > 1e-3  # the two differ: the test can tell them apart


def test_first_order_maml_is_the_gradient_at_the_adapted_parameters():
    steps, lr = 4, 0.05
    task = SINE_TASKS[1]
    m = meta.MAML(MLP, inner_steps=steps, inner_lr=lr, first_order=True)
    grad, info = m.meta_gradient(MLP_THETA, task)
    ref = maml_by_hand(MLP_THETA, task, steps, lr, create_graph=False)
    assert rel(grad, ref) < 1e-13
    assert info.status == "first_order"
    second = maml_by_hand(MLP_THETA, task, steps, lr)
    assert rel(grad, second) > 1e-3


def test_maml_with_adam_matches_finite_differences():
    steps = 3
    opt = hg.optim.adam(lr=0.02)
    task = SINE_TASKS[2]
    grad, _ = meta.MAML(mlp_loss, inner_steps=steps, inner_optimizer=opt).meta_gradient(
        MLP_THETA, task
    )

    def loop(theta_flat):
        p = _unflat(theta_flat, MLP_THETA)
        keys = list(p)
        leaves = [p[k] for k in keys]
        state = opt.init(leaves)
        for s in range(steps):
            leaves = [t.detach().requires_grad_(True) for t in leaves]
            g = torch.autograd.grad(mlp_loss(dict(zip(keys, leaves)), task[0]), leaves)
            leaves, state = opt.update([t.detach() for t in leaves], list(g), state, s)
        return mlp_loss(dict(zip(keys, leaves)), task[1])

    fd = central_fd(loop, _flat(MLP_THETA))
    assert rel(grad, fd) < 1e-6


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_step_mean_vectorized_and_checkpointed(first_order, device):
    steps, lr = 3, 0.05
    refs = [maml_by_hand(MLP_THETA, t, steps, lr, create_graph=not first_order) for t in SINE_TASKS]
    ref = {k: torch.stack([r[k] for r in refs]).mean(0) for k in MLP_THETA}  # CPU
    mlp = to_device(device, copy.deepcopy(MLP))
    theta, tasks = meta.parameters_of(mlp), to_device(device, SINE_TASKS)
    kwargs = dict(inner_steps=steps, inner_lr=lr, first_order=first_order)
    grad, info = meta.maml_step(mlp, theta, tasks, **kwargs)
    assert all(grad[k].device == theta[k].device for k in theta)
    assert rel(cpu(grad), ref) < 1e-12
    assert info.method == ("fomaml" if first_order else "maml") and len(info.tasks) == 3
    vgrad, vinfo = meta.maml_step(mlp, theta, tasks, vectorize=True, **kwargs)
    assert vinfo.vectorized and rel(cpu(vgrad), ref) < 1e-12
    for a, b in zip(info.tasks, vinfo.tasks):
        assert a.query_loss == pytest.approx(b.query_loss, rel=1e-12)
        assert a.support_loss_after == pytest.approx(b.support_loss_after, rel=1e-12)
        assert a.support_loss_after < a.support_loss_before
    if not first_order:
        cgrad, _ = meta.maml_step(mlp, theta, tasks, checkpoint_every=2, **kwargs)
        assert rel(cpu(cgrad), ref) < 1e-12


def test_adapt_matches_a_plain_loop_and_leaves_inputs_alone():
    before = {k: v.clone() for k, v in MLP_THETA.items()}
    task = SINE_TASKS[0]
    phi = meta.adapt(MLP, MLP_THETA, task[0], steps=3, lr=0.05)
    p = dict(MLP_THETA)
    for _ in range(3):
        g = torch.func.grad(mlp_loss)(p, task[0])
        p = {k: p[k] - 0.05 * g[k] for k in p}
    assert rel(phi, p) < 1e-14
    assert all(torch.equal(before[k], MLP_THETA[k]) for k in before)
    assert all(not v.requires_grad for v in phi.values())


def test_meta_params_may_be_leaves_of_an_outer_optimizer():
    theta = {k: v.clone().requires_grad_(True) for k, v in MLP_THETA.items()}
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    grad, info = meta.maml_step(MLP, theta, SINE_TASKS[:2], inner_steps=1, inner_lr=0.05)
    for k in theta:
        assert not grad[k].requires_grad
        theta[k].grad = grad[k]
    refs = [maml_by_hand(MLP_THETA, t, 1, 0.05) for t in SINE_TASKS[:2]]
    assert rel(grad, {k: (refs[0][k] + refs[1][k]) / 2 for k in theta}) < 1e-12
    opt.step()
    assert all(not torch.equal(theta[k].detach(), MLP_THETA[k]) for k in theta)


# ----------------------------------------------------------------------------- validation


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="`lam`"):
        meta.IMAML(lsq, lam=0.0, inner_steps=5, inner_lr=0.1)
    with pytest.raises(ValueError, match="`lam`"):
        meta.imaml_step(lsq, THETA, TASKS, lam=-1.0, inner_steps=5, inner_lr=0.1)
    with pytest.raises(TypeError, match="`lam`"):
        meta.IMAML(lsq, lam="1", inner_steps=5, inner_lr=0.1)
    with pytest.raises(ValueError, match="`inner_steps`"):
        meta.IMAML(lsq, lam=1.0, inner_steps=0, inner_lr=0.1)
    with pytest.raises(ValueError, match="`inner_steps`"):
        meta.maml_step(lsq, THETA, TASKS, inner_steps=-2, inner_lr=0.1)
    with pytest.raises(TypeError, match="`inner_steps`"):
        meta.MAML(lsq, inner_steps=2.5, inner_lr=0.1)
    with pytest.raises(ValueError, match="`inner_lr`"):
        meta.MAML(lsq, inner_steps=1, inner_lr=0.0)
    with pytest.raises(ValueError, match="exactly one of `inner_lr`"):
        meta.MAML(lsq, inner_steps=1)
    with pytest.raises(ValueError, match="exactly one of `inner_lr`"):
        meta.MAML(lsq, inner_steps=1, inner_lr=0.1, inner_optimizer=hg.optim.sgd(lr=0.1))
    with pytest.raises(TypeError, match="`inner_optimizer`"):
        meta.MAML(lsq, inner_steps=1, inner_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="weight_decay"):
        meta.MAML(lsq, inner_steps=1, inner_optimizer=hg.optim.sgd(lr=0.1, weight_decay=0.1))
    with pytest.raises(TypeError, match="`solver`"):
        meta.IMAML(lsq, lam=1.0, inner_steps=1, inner_lr=0.1, solver="cg")
    with pytest.raises(ValueError, match="`damping`"):
        meta.IMAML(lsq, lam=1.0, inner_steps=1, inner_lr=0.1, damping=-1.0)
    with pytest.raises(TypeError, match="`model_or_loss`"):
        meta.MAML(3, inner_steps=1, inner_lr=0.1)
    with pytest.raises(TypeError, match="`first_order`"):
        meta.MAML(lsq, inner_steps=1, inner_lr=0.1, first_order=1)
    m = meta.MAML(lsq, inner_steps=1, inner_lr=0.1)
    with pytest.raises(ValueError, match="`tasks` is empty"):
        m.step(THETA, [])
    with pytest.raises(TypeError, match=r"`tasks\[1\]`"):
        m.step(THETA, [TASKS[0], TASKS[1][0][0]])
    with pytest.raises(TypeError, match="`tasks`"):
        m.step(THETA, TASKS[0][0][0])
    with pytest.raises(TypeError, match="meta_params"):
        m.step({"w": [1.0, 2.0]}, TASKS)
    ragged = [TASKS[0], regression_task(n_support=7)]
    with pytest.raises(ValueError, match="vectorize=True"):
        meta.MAML(lsq, inner_steps=1, inner_lr=0.1, vectorize=True).step(THETA, ragged)
    assert rel(m.step(THETA, ragged)[0], m.step(THETA, ragged)[0]) == 0.0  # the loop is fine
    with pytest.raises(ValueError, match="`steps`"):
        meta.adapt(lsq, THETA, TASKS[0][0], steps=0, lr=0.1)
    with pytest.raises(TypeError, match="pair \\(inputs, targets\\)"):
        meta.adapt(MLP, MLP_THETA, torch.zeros(3, 1, dtype=DT), steps=1, lr=0.1)


def test_imaml_warns_on_an_indefinite_system():
    # A concave support loss: H + lam I is negative definite, CG stops and says so.
    def concave(params, batch):
        return -lsq(params, batch)

    im = meta.IMAML(concave, lam=1e-3, inner_steps=1, inner_lr=1e-3, solver=hg.CG(maxiter=10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = im.meta_gradient(THETA, TASKS[0])
    assert info.status == "negative_curvature"
    assert any(issubclass(w.category, hg.HypergradientWarning) for w in caught)


@pytest.mark.parametrize("vectorize", [False, True])
def test_first_order_maml_refuses_a_diverged_adaptation_with_finite_parameters(vectorize):
    # float32: ten steps at lr 0.5 on x = 10 put w near 1e19, finite, and its gradient
    # finite too, but the losses overflow. First-order MAML returned a meta-gradient of
    # -1.8e21 (one Adam step on it left exp_avg_sq = inf); second order and iMAML raised.
    def loss_fn(p, batch):
        x, y = batch
        return ((x @ p["w"] - y) ** 2).mean()

    x, y = torch.tensor([[10.0]]), torch.tensor([1.0])
    theta = {"w": torch.tensor([0.0])}
    for first_order in (True, False):
        with pytest.raises(hg.NonFiniteHypergradientError, match="not finite"):
            meta.maml_step(
                loss_fn,
                theta,
                [((x, y), (x, y))],
                inner_steps=10,
                inner_lr=0.5,
                first_order=first_order,
                vectorize=vectorize,
            )
    assert torch.equal(theta["w"], torch.tensor([0.0]))


def test_imaml_refuses_a_lam_that_requires_grad():
    # a learned lam got grad None, silently (inner_lr was already refused the same way)
    lam = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="`lam` is a tensor that requires grad"):
        meta.IMAML(lambda p, b: (p["w"] ** 2).sum(), lam=lam, inner_steps=3, inner_lr=0.1)
    meta.IMAML(lambda p, b: (p["w"] ** 2).sum(), lam=lam.detach(), inner_steps=3, inner_lr=0.1)


@pytest.mark.parametrize("train", [True, False])
def test_a_running_statistic_in_meta_params_is_refused_naming_it(train):
    # train mode: its value was ignored and its meta-gradient zero, silently; eval mode: a
    # raw torch error (native_batch_norm is not differentiable w.r.t. running_mean)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).train(train)
    theta = meta.parameters_of(model)
    theta["1.running_mean"] = model[1].running_mean.clone()
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    with pytest.raises(ValueError, match=r"'1.running_mean', a normalization layer's running"):
        meta.maml_step(model, theta, [((x, y), (x, y))], inner_steps=1, inner_lr=0.1)
    del theta["1.running_mean"]
    meta.maml_step(model, theta, [((x, y), (x, y))], inner_steps=1, inner_lr=0.1)
