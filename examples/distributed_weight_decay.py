"""Per-parameter weight decay tuned across processes with torch.distributed (DDP + gloo).

Each process trains the same MLP on its own shard of scikit-learn's digits with
``DistributedDataParallel`` (gradients averaged across ranks) and tunes one weight decay
per weight with ``hg.HyperOptimizer(..., process_group=WORLD)``: hypergradients are those
of the averaged objectives (each Hessian-vector product is one all-reduce), identical on
every rank, so the hyperparameters stay in sync without any extra communication code.

Run on 2 CPU processes::

    .venv/bin/torchrun --nproc_per_node 2 examples/distributed_weight_decay.py

or in one process (the same global batch, for comparison)::

    .venv/bin/python examples/distributed_weight_decay.py

Every rank prints the same figures; the checksum of the learned decays shows they agree.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import hypergradient as hg

F = torch.nn.functional


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = 60 if args.quick else args.steps

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        group = dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    torch.set_num_threads(1)

    # data: the same global split on every rank, then each rank keeps its shard
    X, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    X = torch.as_tensor(X, dtype=torch.float32)[perm] / 16.0
    y = torch.as_tensor(y)[perm]
    n_train, n_val = 400, 400
    train = (X[:n_train], y[:n_train])
    val = (X[n_train : n_train + n_val], y[n_train : n_train + n_val])
    test = (X[n_train + n_val :], y[n_train + n_val :])

    def shard(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = data[0].shape[0] // world
        return tuple(t[rank * size : (rank + 1) * size] for t in data)  # type: ignore[return-value]

    train_shard, val_shard = shard(train), shard(val)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    decays = {
        name: hg.Positive(torch.full_like(p, 1e-3))
        for name, p in model.named_parameters()
        if p.dim() == 2
    }
    n_hparams = sum(d.raw.numel() for d in decays.values())
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    def train_loss(m, h, batch):
        weights = [p for p in m.parameters() if p.dim() == 2]
        penalty = sum((d * w**2).sum() for d, w in zip(h.values(), weights))
        return F.cross_entropy(m(batch[0]), batch[1]) + 0.5 * penalty

    def val_loss(m, h, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    hopt = hg.HyperOptimizer(  # history_size=None: every hyper-step's record is kept
        net,
        decays,
        history_size=None,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=val_shard,
        method=hg.IFT(hg.Neumann(maxiter=20, alpha="auto")),
        inner_steps=10,
        process_group=group,
    )

    def evaluate(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        with torch.no_grad():
            out = model(data[0])
            return float(F.cross_entropy(out, data[1])), float(
                (out.argmax(1) == data[1]).float().mean()
            )

    started = time.perf_counter()
    warmup = steps // 3
    for step in range(steps):
        hopt.zero_grad()
        hopt.train_loss(train_shard).backward()
        if step < warmup:  # let the weights settle before tuning
            hopt.inner_optimizer.step()
        else:
            hopt.step(train_shard)
    elapsed = time.perf_counter() - started

    val_l, val_a = evaluate(val)
    test_l, test_a = evaluate(test)
    seconds = [r.seconds for r in hopt.history]
    checksum = sum(float(d.value.double().log().sum()) for d in decays.values())
    first = hopt.history[0].val_loss if hopt.history else float("nan")
    last = hopt.history[-1].val_loss if hopt.history else float("nan")
    print(
        f"[rank {rank}/{world}] {n_hparams} decays, {hopt.hyper_steps} hyper-steps "
        f"({hopt.skipped} skipped) in {elapsed:.1f} s\n"
        f"[rank {rank}/{world}] hyper-step val loss {first:.4f} -> {last:.4f}; "
        f"full val loss {val_l:.4f} (acc {val_a:.3f}), test loss {test_l:.4f} (acc {test_a:.3f})\n"
        f"[rank {rank}/{world}] mean hyper-step {1e3 * sum(seconds) / max(len(seconds), 1):.1f} ms;"
        f" checksum of log decays {checksum:.10f}",
        flush=True,
    )
    if args.quick and rank == 0:
        print("quick mode: a smoke run; the documented figures come from the full run")
    if distributed:  # every rank done before any closes its connections (gloo aborted a
        dist.barrier()  # rank whose peer tore down first: "terminate called ...", SIGABRT)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
