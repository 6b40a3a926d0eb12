"""Adversarial round 11 (meta): two mistakes of a user's meta-training loop, named with the fix.

- One task ``(support, query)`` passed as ``tasks`` to ``step``: its two batches were read as
  two tasks; with an ``nn.Module`` the error said a batch must be a pair (no word of the
  cause), and with ``vectorize=True`` it blamed "ragged tasks" and advised vectorize=False.
- ``hg.optim.from_torch(...)`` (a tuple ``(twin, state, step)``) passed as
  ``inner_optimizer``: refused as "got tuple"; the message now says to take its first item.
"""

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError


def _task(n: int, m: int) -> tuple:
    return (torch.randn(n, 3), torch.randn(n, 1)), (torch.randn(m, 3), torch.randn(m, 1))


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("cls", ["MAML", "IMAML"])
def test_one_task_passed_as_tasks_is_named_with_the_fix(cls: str, vectorize: bool) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    theta = hg.meta.parameters_of(net, copy=True)
    before = {k: v.clone() for k, v in theta.items()}
    kw = {"lam": 1.0, "inner_steps": 200} if cls == "IMAML" else {"inner_steps": 2}
    learner = getattr(hg.meta, cls)(net, inner_lr=0.1, vectorize=vectorize, **kw)
    task = _task(4, 5)
    with pytest.raises(ArgumentTypeError, match=r"tasks\[0\]'s support batch is a Tensor.*\[task"):
        learner.step(theta, task)
    assert all(torch.equal(theta[k], before[k]) for k in theta)
    # wrapped in a list it runs, and is the one task's meta-gradient
    grad, _ = learner.step(theta, [task])
    one, _ = learner.meta_gradient(theta, task)
    for k in grad:
        torch.testing.assert_close(grad[k], one[k], rtol=0, atol=0)


def test_a_loss_function_still_takes_tensor_batches() -> None:
    # the check is for a module's (inputs, targets) batches only: a callable loss may
    # take any batch, a tensor included
    torch.manual_seed(0)
    x_s, x_q = torch.randn(4, 3), torch.randn(5, 3)

    def loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ((x @ w - 1.0) ** 2).mean()

    w = torch.randn(3, dtype=torch.float64)
    grad, _ = hg.meta.MAML(loss, inner_steps=1, inner_lr=0.1).step(w.float(), [(x_s, x_q)])
    ref = w.float().clone().requires_grad_()
    phi = ref - 0.1 * torch.autograd.grad(loss(ref, x_s), ref, create_graph=True)[0]
    (expected,) = torch.autograd.grad(loss(phi, x_q), ref)
    torch.testing.assert_close(grad, expected)


def test_from_torchs_tuple_as_inner_optimizer_names_its_first_item() -> None:
    net = torch.nn.Linear(3, 1)
    params = list(net.parameters())
    pair = hg.optim.from_torch(torch.optim.SGD(params, lr=0.1), params)
    for make in (
        lambda: hg.meta.MAML(net, inner_steps=1, inner_optimizer=pair),
        lambda: hg.meta.IMAML(net, lam=1.0, inner_steps=1, inner_optimizer=pair),
    ):
        with pytest.raises(ArgumentTypeError, match=r"from_torch\(optimizer, params\)\[0\]"):
            make()
    theta = hg.meta.parameters_of(net, copy=True)
    with pytest.raises(ArgumentTypeError, match=r"\[0\]"):
        hg.meta.adapt(net, theta, _task(3, 3)[0], steps=1, optimizer=pair)
    # the first item works, and is plain SGD: the same meta-gradient as inner_lr
    torch.manual_seed(1)
    tasks = [_task(4, 5), _task(4, 5)]
    a, _ = hg.meta.MAML(net, inner_steps=2, inner_optimizer=pair[0]).step(theta, tasks)
    b, _ = hg.meta.MAML(net, inner_steps=2, inner_lr=0.1).step(theta, tasks)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
