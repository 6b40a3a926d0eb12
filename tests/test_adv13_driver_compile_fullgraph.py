"""``torch.compile(model, fullgraph=True)`` in ``HyperOptimizer``.

The hyper-steps' forward passes run inside blocks (``recompute.watch``, ``keep_buffers``)
whose global forward hooks were registered per block: a compiled module recompiled inside
one traced them (the saved-tensor-hooks query dynamo cannot trace: ``Unsupported`` under
``fullgraph=True``), and dynamo guards such a graph on the hooks' keys (handle ids), so
every hyper-step recompiled until the recompile limit (``FailOnRecompileLimitHit``). The
hooks now come back under the same keys at each block and do nothing while dynamo traces:
the hypergradients and BatchNorm statistics equal the uncompiled ones, recompilations stay
bounded, a graph traced inside a block is not buffer-neutral outside it (no hook code baked
in), and no hook is left outside the blocks (training's forward passes pay none).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import hypergradient as hg
from hypergradient.operators.buffers import keep_buffers


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [
        torch.nn.Linear(6, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 1),
    ]
    return torch.nn.Sequential(*layers)


def _run(model: torch.nn.Module, method: hg.Method, steps: int = 12) -> list[float]:
    """The hypergradients, then BatchNorm's running mean and count."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 6, generator=g), torch.randn(64, generator=g)

    def train_loss(m, h, b):
        penalty = sum((p**2).sum() for p in m.parameters())
        return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + h["wd"].exp() * penalty

    def val_loss(m, h, b):
        return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        model,
        {"wd": hg.Unconstrained(torch.tensor(-3.0))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(X, y),
        method=method,
        inner_steps=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "global hooks" note on OptimizedModule
        for _ in range(steps):
            hopt.zero_grad()
            hopt.train_loss((X, y)).backward()
            hopt.step((X, y))
    assert hopt.hyper_steps == steps // 2 and hopt.skipped == 0
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    return [float(r.hypergrad["wd"]) for r in hopt.history] + [
        *bn.running_mean.tolist(),
        int(bn.num_batches_tracked),
    ]


@pytest.mark.parametrize("method", [hg.IFT, hg.T1T2, hg.Unrolled])
def test_fullgraph_hypergradients_equal_the_eager_ones_with_bounded_recompiles(method):
    eager = _run(_net(), method())
    torch._dynamo.reset()
    counter = CompileCounter()  # the eager backend: double backward as uncompiled
    compiled = _run(torch.compile(_net(), backend=counter, fullgraph=True), method())
    torch._dynamo.reset()
    assert len(compiled) == len(eager) == 6 + 8 + 1
    assert compiled[-1] == 12  # training's 12 forward passes, none of the hyper-steps'
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-9)
    # training's graph and the hyper-steps' (functional_call's tensors, the hooks present):
    # two or three, not one per hyper-step (6 here; the recompile limit is 8)
    assert counter.frame_count <= 3
    assert not torch.nn.modules.module._has_any_global_hook()


def test_a_graph_traced_in_a_keep_buffers_block_updates_statistics_outside_it():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    compiled = torch.compile(net, backend=CompileCounter(), fullgraph=True)
    x = torch.randn(16, 3)
    mean0 = net[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with keep_buffers():  # traced here first
            compiled(x)
        assert torch.equal(net[1].running_mean, mean0)
        assert int(net[1].num_batches_tracked) == 0
        compiled(x)  # training: the statistics move
    ref = 0.9 * mean0 + 0.1 * net[0](x).detach().mean(0)
    assert torch.allclose(net[1].running_mean, ref, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 1
    torch._dynamo.reset()


def test_the_blocks_hooks_come_back_under_the_same_keys_and_leave():
    from torch.nn.modules import module as nn_module

    from hypergradient.operators import recompute

    seen = []
    for _ in range(3):
        with keep_buffers(), recompute.watch():
            seen.append(list(nn_module._global_forward_pre_hooks))
            with keep_buffers():  # nested: nothing added
                assert list(nn_module._global_forward_pre_hooks) == seen[-1]
        assert not nn_module._has_any_global_hook()
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]
