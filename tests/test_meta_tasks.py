"""The task-batch interface: one block-separable problem, one task or a stack of them.

``StackedTasks`` must be exactly ``B`` ``SingleTask`` problems side by side: the gradient of
the summed support loss in block ``b`` is task ``b``'s own gradient, the query loss is the
mean, ``reduce`` sums the blocks, and the per-task diagnostics of a vectorized meta-batch
equal those of the task-by-task run. MAML and iMAML are written once against the interface,
so ``batch_gradient`` on a stack is the mean of ``batch_gradient`` on the single tasks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import hypergradient as hg
from hypergradient import _tree, meta

DT = torch.float64
D = 3
GEN = torch.Generator().manual_seed(7)


def lsq(params, batch):
    x, y = batch
    return 0.5 * ((x @ params["w"] + params["b"] - y) ** 2).mean()


def task(n: int = 8):
    w = torch.randn(D, generator=GEN, dtype=DT)
    xs, xq = torch.randn(n, D, generator=GEN, dtype=DT), torch.randn(n, D, generator=GEN, dtype=DT)
    return (xs, xs @ w), (xq, xq @ w + 0.1)


TASKS = [task() for _ in range(3)]
THETA = {"w": torch.randn(D, generator=GEN, dtype=DT), "b": torch.tensor(0.2, dtype=DT)}
LEAVES, SPEC = _tree.flatten(THETA, "meta_params")


def stacked_phi() -> list[torch.Tensor]:
    """Different parameters per task (so a mix-up between blocks would show)."""
    return [t + 0.1 * torch.randn(3, *t.shape, generator=GEN, dtype=DT) for t in LEAVES]


def grad_of(fn, leaves):
    g, _ = meta._common.gradient(fn, leaves, SPEC)
    return g


def test_both_implementations_satisfy_the_protocol():
    single, stacked = meta.SingleTask(lsq, TASKS[0]), meta.StackedTasks(lsq, TASKS)
    assert isinstance(single, meta.TaskBatch) and isinstance(stacked, meta.TaskBatch)
    assert (single.num_tasks, stacked.num_tasks) == (1, 3)
    assert [type(b) for b in meta.task_batches(lsq, TASKS, vectorize=False)] == [
        meta.SingleTask
    ] * 3
    assert [type(b) for b in meta.task_batches(lsq, TASKS, vectorize=True)] == [meta.StackedTasks]


def test_stacked_blocks_are_the_single_tasks_side_by_side():
    stacked = meta.StackedTasks(lsq, TASKS)
    singles = [meta.SingleTask(lsq, t) for t in TASKS]
    phi = stacked_phi()
    blocks = [[x[b] for x in phi] for b in range(3)]
    # the summed support loss: block b's gradient is task b's own gradient
    g_stacked = grad_of(stacked.support_loss, phi)
    for b, s in enumerate(singles):
        g_single = grad_of(s.support_loss, blocks[b])
        for x, y in zip(g_stacked, g_single):
            assert torch.allclose(x[b], y, rtol=1e-14, atol=0)
    # the query loss is the mean of the tasks' query losses, and so are its gradients / B
    q = [float(s.query_loss(_tree.unflatten(SPEC, blk))) for s, blk in zip(singles, blocks)]
    assert float(stacked.query_loss(_tree.unflatten(SPEC, phi))) == pytest.approx(
        sum(q) / 3, rel=1e-15
    )
    assert stacked.task_losses(_tree.unflatten(SPEC, phi), "query") == pytest.approx(q, rel=1e-15)
    # reduce sums the blocks; task_norms are per block
    assert torch.equal(stacked.reduce(phi)[0], phi[0].sum(0))
    norms = [float(torch.cat([x.reshape(-1) for x in blk]).norm()) for blk in blocks]
    assert stacked.task_norms(phi) == pytest.approx(norms, rel=1e-14)
    assert singles[1].task_norms(blocks[1]) == pytest.approx([norms[1]], rel=1e-14)
    # start: theta copied into every block, never aliased
    start = stacked.start(LEAVES)
    assert start[0].shape == (3, D) and torch.equal(start[0][2], LEAVES[0])
    start[0][0, 0] += 1.0
    assert not torch.equal(start[0][0], LEAVES[0]) and torch.equal(start[0][1], LEAVES[0])


@pytest.mark.parametrize(
    "learner",
    [
        meta.MAML(lsq, inner_steps=3, inner_lr=0.2),
        meta.MAML(lsq, inner_steps=3, inner_optimizer=hg.optim.adam(lr=0.05), first_order=True),
        meta.IMAML(lsq, lam=0.8, inner_steps=3, inner_lr=0.2, solver=hg.Exact()),
    ],
    ids=["maml", "fomaml-adam", "imaml-exact"],
)
def test_one_code_path_stack_is_the_mean_of_the_single_tasks(learner):
    stacked = learner.batch_gradient(LEAVES, SPEC, meta.StackedTasks(lsq, TASKS))
    singles = [learner.batch_gradient(LEAVES, SPEC, meta.SingleTask(lsq, t)) for t in TASKS]
    for i, g in enumerate(stacked.grad):
        mean = torch.stack([s.grad[i] for s in singles]).mean(0)
        assert torch.allclose(g, mean, rtol=1e-12, atol=1e-15)
    for b, s in enumerate(singles):  # the adapted parameters, block by block
        for x, y in zip(stacked.phi, s.phi):
            assert torch.allclose(x[b], y, rtol=1e-13, atol=1e-15)
    assert stacked.status == singles[0].status


def test_vectorized_imaml_reports_each_tasks_stationarity():
    # Three inner steps: far from the minimizer, so the norms are large and distinct.
    kwargs = dict(lam=0.5, inner_steps=3, inner_lr=0.1, solver=hg.Exact())
    _, loop = meta.imaml_step(lsq, THETA, TASKS, **kwargs)
    _, vec = meta.imaml_step(lsq, THETA, TASKS, vectorize=True, **kwargs)
    a = [t.inner_grad_norm for t in loop.tasks]
    b = [t.inner_grad_norm for t in vec.tasks]
    assert min(a) > 1e-2 and len(set(a)) == 3
    assert b == pytest.approx(a, rel=1e-12)
    assert vec.max_inner_grad_norm == pytest.approx(max(a), rel=1e-12)
    assert [t.support_loss_after for t in vec.tasks] == pytest.approx(
        [t.support_loss_after for t in loop.tasks], rel=1e-12
    )


def test_ragged_tasks_need_the_per_task_path():
    ragged = [TASKS[0], task(n=5)]
    with pytest.raises(ValueError, match="vectorize=True needs batches of one structure"):
        meta.StackedTasks(lsq, ragged)
    assert len(meta.task_batches(lsq, ragged, vectorize=False)) == 2


def test_a_loss_that_is_not_scalar_per_task_is_named():
    stacked = meta.StackedTasks(lambda p, b: b[0] @ p["w"], TASKS)
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar tensor per task"):
        stacked.support_loss(_tree.unflatten(SPEC, stacked_phi()))
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar tensor"):
        meta.SingleTask(lambda p, b: b[0] @ p["w"], TASKS[0]).support_loss(THETA)


META = Path(meta.__file__).parent


def test_meta_imports_no_private_names_and_modules_stay_small():
    for path in sorted(META.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private = [n for n in private if n not in ("_tree", "_vocab")]  # modules
                assert not private, f"{path.name} imports private names {private}"
        assert len(path.read_text().splitlines()) < 400, path.name
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            assert cls.end_lineno - cls.lineno < 250, f"{path.name}: {cls.name}"
