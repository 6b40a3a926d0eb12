"""Param groups whose equal ``betas`` are a tuple in one group and a list in another (a group
read from a JSON or YAML config) have a twin (adversarial probe, round 6). ``from_torch``
compared them with ``==`` and refused "The inner optimizer's param groups differ in
`betas`" although torch steps both groups with the same betas."""

from __future__ import annotations

import torch

import hypergradient as hg

DT = torch.float64


def test_equal_betas_as_tuple_and_list_replay_as_torch():
    a = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    b = torch.tensor([0.5, 0.25, -1.0], dtype=DT, requires_grad=True)
    groups = [{"params": [a]}, {"params": [b], "betas": [0.8, 0.99], "lr": 0.02}]
    opt = torch.optim.Adam(groups, lr=0.1, betas=(0.8, 0.99))
    twin, state, step = hg.optim.from_torch(opt, [a, b])
    assert twin.group_of == [0, 1] and state is None and step == 0
    ps, state = [a.detach().clone(), b.detach().clone()], twin.init([a, b])

    def loss(x, y, t):
        return ((x - t) ** 2).sum() + (y**4).sum()

    for t in range(5):
        opt.zero_grad()
        loss(a, b, t).backward()
        opt.step()
        qs = [p.clone().requires_grad_() for p in ps]
        grads = list(torch.autograd.grad(loss(*qs, t), qs))
        ps, state = twin.update(ps, grads, state, t)
    torch.testing.assert_close(ps[0], a.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ps[1], b.detach(), rtol=1e-14, atol=1e-15)
