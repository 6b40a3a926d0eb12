"""Data-parallel methods over 2 gloo processes: equal to the single-process hypergradient
on the union of the shards (every method of the registry), and safe: a mismatch of values or
configuration between ranks raises a ValueError on every rank, and a rank whose loss raises
stops every rank within seconds (no hang, no abort inside the backend)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import shared_dict, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(dtype):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    Xt, yt, Xv, yv = X[:200], y[:200], X[200:400], y[200:400]
    loglam = torch.linspace(-4.0, -1.0, 30, dtype=torch.float64)

    def make(Xa, ya, Xb, yb, dtype=dtype):
        def f(w, h):
            z = Xa.to(dtype) @ w[:-1] + w[-1]
            return torch.nn.functional.binary_cross_entropy_with_logits(z, ya.to(dtype)) + (
                0.5 * (h.exp() * w[:-1] ** 2).sum()
            )

        def g(w, h):
            z = Xb.to(dtype) @ w[:-1] + w[-1]
            return torch.nn.functional.binary_cross_entropy_with_logits(z, yb.to(dtype))

        return f, g

    f_full, g_full = make(Xt, yt, Xv, yv)
    w = torch.zeros(31, dtype=torch.float64)
    f64, _ = make(Xt, yt, Xv, yv, torch.float64)
    for _ in range(30):  # Newton on the full data, float64
        gr = torch.func.grad(lambda v: f64(v, loglam))(w)
        if gr.norm() < 1e-13:
            break
        w = w - torch.linalg.solve(torch.func.hessian(lambda v: f64(v, loglam))(w), gr)
    return make, (Xt, yt, Xv, yv), f_full, g_full, w.to(dtype), loglam.to(dtype)


def _worker(rank: int, port: int, results: dict) -> None:
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        group = dist.group.WORLD
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            make, (Xt, yt, Xv, yv), f_full, g_full, w, loglam = _problem(dtype)
            half_t, half_v = len(yt) // WORLD, len(yv) // WORLD
            shard = slice(rank * half_t, (rank + 1) * half_t)
            vshard = slice(rank * half_v, (rank + 1) * half_v)
            f, g = make(Xt[shard], yt[shard], Xv[vshard], yv[vshard])
            solvers = [
                lambda: hg.Exact(),
                lambda: hg.CG(maxiter=200, tol=1e-12),
                lambda: hg.Neumann(maxiter=50, alpha="auto", seed=0),
                lambda: hg.Nystrom(rank=10, rho=1e-2, seed=0),
                lambda: hg.NystromPCG(rank=10, maxiter=100, tol=1e-12, seed=0),
            ]
            for make_solver in solvers:
                solver = make_solver()  # fresh: same random sketch as the reference
                ref = hg.implicit(f_full, g_full, w, loglam, make_solver())
                got, info = hg.implicit(
                    f, g, w, loglam, solver, process_group=group, return_info=True
                )
                err = float((got.double() - ref.double()).norm() / ref.double().norm())
                assert err < tol, (rank, dtype, solver, err)
                # every rank holds the same bits
                other = got.clone()
                dist.broadcast(other, src=0)
                assert torch.equal(other, got), (rank, solver)
                assert info.inner_grad_norm < (1e-10 if dtype == torch.float64 else 1e-4)
        # trajectory methods: every step uses the gradient averaged over the shards, which
        # for equal shards is the full-data gradient
        make, (Xt, yt, Xv, yv), f_full, g_full, w, loglam = _problem(torch.float64)
        f, g = make(Xt[shard], yt[shard], Xv[vshard], yv[vshard])
        lr = torch.tensor(0.5, dtype=torch.float64)
        hp = {"loglam": loglam, "lr": lr}

        def tf(p, h, f=f):
            return f(p, h["loglam"])

        def tg(p, h, g=g):
            return g(p, h["loglam"])

        def tf_full(p, h):
            return f_full(p, h["loglam"])

        def tg_full(p, h):
            return g_full(p, h["loglam"])

        w0 = torch.zeros(31, dtype=torch.float64)
        for method in (hg.unrolled, hg.forward_mode, hg.drmad):
            opt = hg.optim.sgd(lr=lr, momentum=0.9)
            ref = method(tf_full, tg_full, w0, hp, 15, opt)
            got = method(tf, tg, w0, hp, 15, opt, process_group=group)
            for k in hp:
                err = float((got[k] - ref[k]).norm() / ref[k].norm())
                assert err < 1e-10, (rank, method.__name__, k, err)
        opt = hg.optim.adam(lr=lr)
        ref = hg.unrolled(tf_full, tg_full, w0, hp, 10, opt, truncate=4)
        got = hg.unrolled(tf, tg, w0, hp, 10, opt, truncate=4, process_group=group)
        assert float((got["lr"] - ref["lr"]).abs()) < 1e-10 * float(ref["lr"].abs())

        # bad input, detected on every rank instead of a hang
        make, _, _, _, w, loglam = _problem(torch.float64)
        f, g = make(Xt[shard], yt[shard], Xv[vshard], yv[vshard])
        with pytest.raises(ValueError, match="hparams.*differ between ranks"):
            hg.implicit(f, g, w, loglam + rank, hg.CG(), process_group=group)
        with pytest.raises(ValueError, match="params.*differ between ranks"):
            hg.implicit(f, g, w + rank, loglam, hg.CG(), process_group=group)
        with pytest.raises(ValueError, match="params0.*different structures"):
            bad0 = [w0, w0[:1]] if rank == 0 else [w0]
            hg.unrolled(
                lambda p, h: tf(p[0], h),
                lambda p, h: tg(p[0], h),
                bad0,
                hp,
                2,
                hg.optim.sgd(lr=0.1),
                process_group=group,
            )
        with pytest.raises(ValueError, match="seed"):  # per-rank seeds: another sketch per rank
            hg.implicit(f, g, w, loglam, hg.Nystrom(rank=5, seed=rank), process_group=group)
        only0 = dist.new_group([0])  # collective: every rank creates it
        if rank == 1:
            with pytest.raises(ValueError, match="not a member"):
                hg.implicit(f, g, w, loglam, hg.CG(), process_group=only0)

        # a NaN on one rank: every rank raises, none applies a different result
        def g_nan(p, h):
            bad = torch.tensor(float("nan") if rank == 1 else 1.0, dtype=torch.float64)
            return g(p, h) * bad

        with pytest.raises(hg.NonFiniteHypergradientError):
            hg.implicit(f, g_nan, w, loglam, hg.CG(), process_group=group)
        results[rank] = "ok"
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes_match_single_process():
    results = shared_dict()
    spawn(_worker, (_free_port(), results))
    for rank in range(WORLD):
        assert results.get(rank) == "ok", results.get(rank)


def test_process_group_without_init_is_refused():
    w = torch.zeros(3)
    with pytest.raises(ValueError, match="not initialized"):
        hg.implicit(
            lambda p, h: (p**2).sum() * h,
            lambda p, h: p.sum(),
            w,
            torch.ones(()),
            process_group=object(),
        )


def _hopt_worker(rank: int, port: int, results: dict) -> None:
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        _, (Xt, yt, Xv, yv), _, _, _, _ = _problem(torch.float64)
        half_t, half_v = len(yt) // WORLD, len(yv) // WORLD
        shard = (Xt[rank * half_t : (rank + 1) * half_t], yt[rank * half_t : (rank + 1) * half_t])
        vshard = (Xv[rank * half_v : (rank + 1) * half_v], yv[rank * half_v : (rank + 1) * half_v])
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        def train_loss(m, h, b):
            # m is the DDP wrapper in the user's loop and the plain module in hyper-steps:
            # reach the weight through parameters(), which both have
            weight = next(p for p in m.parameters() if p.dim() == 2)
            return bce(m(b[0]).reshape(-1), b[1]) + 0.5 * (h["decay"] * weight[0] ** 2).sum()

        def val_loss(m, h, b):
            return bce(m(b[0]).reshape(-1), b[1])

        def run(method, model_wrap, batch, val, group):
            torch.manual_seed(0)
            model = torch.nn.Linear(30, 1).double()
            decay = hg.Positive(torch.full((30,), 1e-2, dtype=torch.float64))
            wrapped = model_wrap(model)
            hopt = hg.HyperOptimizer(
                wrapped,
                {"decay": decay},
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5),
                outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
                train_loss=train_loss,
                val_loss=val_loss,
                val_data=val,
                method=method,
                inner_steps=5,
                process_group=group,
            )
            for _ in range(20):
                hopt.zero_grad()
                hopt.train_loss(batch).backward()
                hopt.step(batch)
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            return flat, decay.raw.detach().clone(), hopt

        full = (Xt[: half_t * WORLD], yt[: half_t * WORLD])
        vfull = (Xv[: half_v * WORLD], yv[: half_v * WORLD])
        ddp = torch.nn.parallel.DistributedDataParallel
        for make in (
            lambda: hg.T1T2(),
            lambda: hg.IFT(hg.CG(maxiter=50, tol=1e-12)),
            lambda: hg.HOAG(),
            lambda: hg.Unrolled(),
            lambda: hg.ForwardMode(),
        ):
            ref_w, ref_h, _ = run(make(), lambda m: m, full, vfull, None)
            w, h, hopt = run(make(), ddp, shard, vshard, dist.group.WORLD)
            assert float((w - ref_w).norm() / ref_w.norm()) < 1e-10, (rank, make())
            assert float((h - ref_h).norm() / ref_h.norm()) < 1e-10, (rank, make())
            assert len(hopt.history) == 4
            same = h.clone()
            dist.broadcast(same, src=0)
            assert torch.equal(same, h)

        # a NaN on one rank: every rank skips the hyper-step, with a warning
        def val_nan(m, h, b):
            bad = torch.tensor(float("nan") if rank == 1 else 1.0, dtype=torch.float64)
            return val_loss(m, h, b) * bad

        torch.manual_seed(0)
        model = torch.nn.Linear(30, 1).double()
        decay = hg.Positive(torch.full((30,), 1e-2, dtype=torch.float64))
        hopt = hg.HyperOptimizer(
            ddp(model),
            {"decay": decay},
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
            train_loss=train_loss,
            val_loss=val_nan,
            val_data=vshard,
            method=hg.IFT(),
            inner_steps=2,
            process_group=dist.group.WORLD,
        )
        raw = decay.raw.detach().clone()
        with pytest.warns(hg.HypergradientWarning, match="skipped"):
            for _ in range(4):
                hopt.zero_grad()
                hopt.train_loss(shard).backward()
                hopt.step(shard)
        assert hopt.skipped == 2 and not hopt.history and torch.equal(decay.raw, raw)
        results[rank] = "ok"
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_hyperoptimizer_with_ddp_on_two_processes_matches_single_process():
    results = shared_dict()
    spawn(_hopt_worker, (_free_port(), results))
    for rank in range(WORLD):
        assert results.get(rank) == "ok", results.get(rank)


def test_torchrun_example_prints_the_same_figures_on_every_rank(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "distributed_weight_decay.py"
    # --standalone: torchrun picks a free port itself; --redirects 3: each rank's stdout and
    # stderr go to their own files, so the ranks' lines cannot interleave.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd += ["2", "--redirects", "3", "--log-dir", str(tmp_path), str(script), "--quick"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    logs = {p: p.read_text() for p in sorted(tmp_path.rglob("*.log"))}
    assert done.returncode == 0, done.stderr[-4000:] + "\n".join(
        f"--- {p}\n{t[-2000:]}" for p, t in logs.items()
    )
    by_rank: dict[str, list[str]] = {}
    for path, text in logs.items():
        if path.name != "stdout.log":
            continue
        for ln in text.splitlines():
            if ln.startswith("[rank"):
                rank, rest = ln.split("]", 1)
                # timings differ between ranks; the figures must not
                rest = re.sub(r"in [0-9.]+ s|mean hyper-step [0-9.]+ ms", "", rest)
                by_rank.setdefault(rank, []).append(rest)
    assert set(by_rank) == {"[rank 0/2", "[rank 1/2"}, logs
    assert by_rank["[rank 0/2"] == by_rank["[rank 1/2"]
    assert "checksum" in " ".join(by_rank["[rank 0/2"])


# ----------------------------------------------------------------------------- the registry


def _spawn(worker) -> None:
    results = shared_dict()
    spawn(worker, (_free_port(), results))
    for rank in range(WORLD):
        assert results.get(rank) == "ok", results.get(rank)


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a short backend timeout: a rank left waiting fails the test instead of hanging it
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )


def _registry_worker(rank: int, port: int, results: dict) -> None:
    from registry import METHODS, rel

    try:
        _init(rank, port)
        group = dist.group.WORLD
        for row in METHODS:
            case = row.case()
            single, distributed = row.make(), row.make()
            for _ in range(row.calls):
                ref, ref_info = single(case.problem())
                shard = dataclasses.replace(case.problem(rank, WORLD), process_group=group)
                got, info = distributed(shard)
            assert rel(got, ref) < 1e-10, (row.id, rel(got, ref))
            assert info.outer_loss == pytest.approx(ref_info.outer_loss, rel=1e-12), row.id
            for a in hg._tree.flatten(got, "got")[0]:  # every rank holds the same bits
                same = a.clone()
                dist.broadcast(same, src=0)
                assert torch.equal(same, a), row.id
        results[rank] = "ok"
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_every_registry_method_on_two_ranks_equals_one_process():
    _spawn(_registry_worker)


def _mismatch_worker(rank: int, port: int, results: dict) -> None:
    from registry import ridge_case, trajectory_case

    try:
        _init(rank, port)
        group = dist.group.WORLD
        ridge = dataclasses.replace(ridge_case().problem(rank, WORLD), process_group=group)
        t1t2 = dataclasses.replace(ridge_case("t1t2").problem(rank, WORLD), process_group=group)
        traj_case = trajectory_case()
        traj = dataclasses.replace(traj_case.problem(rank, WORLD), process_group=group)
        per_rank = [  # (what differs between the ranks, the call)
            (
                "T1T2 hparams",
                lambda: hg.T1T2()(dataclasses.replace(t1t2, hparams=t1t2.hparams + rank)),
            ),
            ("Nystrom seed", lambda: hg.IFT(hg.Nystrom(rank=3, seed=rank))(ridge)),
            ("NystromPCG seed", lambda: hg.Implicit(hg.NystromPCG(rank=3, seed=rank))(ridge)),
            ("damping", lambda: hg.Implicit(hg.CG(), damping=0.1 * rank)(ridge)),
            ("CG maxiter", lambda: hg.Implicit(hg.CG(maxiter=5 + rank))(ridge)),
            ("solver type", lambda: hg.Implicit(hg.CG() if rank else hg.Exact())(ridge)),
            ("method type", lambda: (hg.T1T2() if rank else hg.Implicit())(t1t2)),
            ("HOAG tol", lambda: hg.HOAG(tol=0.1 * (rank + 1))(ridge)),
            ("IFT lr", lambda: hg.IFT()(dataclasses.replace(ridge, lr=0.1 * (rank + 1)))),
            ("truncate", lambda: hg.Unrolled(truncate=2 + rank)(traj)),
            ("steps", lambda: hg.Unrolled()(_steps(traj, 4 + rank))),
            ("optimizer lr", lambda: hg.Unrolled()(_optimizer(traj, lr=0.1 * (rank + 1)))),
            (
                "unrolled lr",
                lambda: _functional_unrolled(traj_case, rank, group, lr=0.1 * (rank + 1)),
            ),
        ]
        for what, call in per_rank:
            started = time.perf_counter()
            with pytest.raises(ValueError, match="differ"):
                call()
            assert time.perf_counter() - started < 20, what
        # the group is still usable: an agreeing call works
        hg.Implicit(hg.CG())(ridge)
        _failures(rank, group)
        results[rank] = "ok"
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _steps(problem, steps):
    t = problem.trajectory
    return dataclasses.replace(problem, trajectory=dataclasses.replace(t, batches=[None] * steps))


def _optimizer(problem, lr):
    opt = hg.optim.sgd(lr=lr, momentum=0.7)
    t = dataclasses.replace(problem.trajectory, optimizer=opt)
    return dataclasses.replace(problem, trajectory=t)


def _functional_unrolled(case, rank, group, lr):
    from registry import shard, traj_losses

    X, y, Xv, yv = (shard(t, rank, WORLD) for t in case.data)
    f, g = traj_losses(X, y, Xv, yv)
    h = {"decay": case.hparams()["decay"]}
    w0 = torch.zeros(5, dtype=torch.float64)
    return hg.unrolled(
        lambda w, hh: f(w, hh), g, w0, h, 3, hg.optim.sgd(lr=lr), process_group=group
    )


def test_mismatches_and_failures_raise_on_every_rank_within_seconds():
    """Per-rank values or configuration: ValueError on every rank; a loss that raises on
    rank 1 only: its error there, RankFailedError on rank 0, within seconds."""
    _spawn(_mismatch_worker)


class _RankError(RuntimeError):
    pass


def _failures(rank: int, group) -> None:
    """A loss raising on rank 1 only, at every collective of every method family."""
    from registry import ridge_case, ridge_losses, traj_losses, trajectory_case

    def failing(losses, where, after_calls=0):
        """The losses, raising on rank 1 only: in `where` ("inner"/"outer"), after n calls."""

        def make(*data):
            inner, outer = losses(*data)
            calls = {"n": 0}

            def wrap(fn, name):
                def loss(*args):
                    calls["n"] += 1
                    if rank == 1 and name == where and calls["n"] > after_calls:
                        raise _RankError(f"{name} fails on rank 1")
                    return fn(*args)

                return loss

            return wrap(inner, "inner"), wrap(outer, "outer")

        return make

    ridge, t1t2, traj = ridge_case(), ridge_case("t1t2"), trajectory_case()
    cases = [
        (hg.Implicit(hg.CG()), ridge, ridge_losses, "inner", 0),
        (hg.Implicit(hg.CG()), ridge, ridge_losses, "outer", 0),
        (hg.HOAG(), ridge, ridge_losses, "inner", 0),
        (hg.T1T2(), t1t2, ridge_losses, "inner", 0),
        (hg.T1T2(), t1t2, ridge_losses, "outer", 0),
        (hg.Unrolled(), traj, traj_losses, "inner", 0),  # the first evaluation
        (hg.Unrolled(), traj, traj_losses, "inner", 3),  # a forward step
        (hg.Unrolled(), traj, traj_losses, "inner", 9),  # the reverse pass
        (hg.Unrolled(), traj, traj_losses, "outer", 0),
        (hg.ForwardMode(), traj, traj_losses, "inner", 4),
        (hg.DrMAD(), traj, traj_losses, "inner", 8),
    ]
    for method, case, losses, where, after in cases:
        problem = case.problem(rank, WORLD, make_inner=failing(losses, where, after))
        problem = dataclasses.replace(problem, process_group=group)
        started = time.perf_counter()
        expected = _RankError if rank == 1 else hg.RankFailedError
        with pytest.raises(expected):
            method(problem)
        assert time.perf_counter() - started < 10, (method, where, after)
    # bad input on one rank only: that rank's error there, RankFailedError elsewhere
    nan_h = ridge.hparams()
    if rank == 1:
        nan_h[0] = float("nan")
    problem = dataclasses.replace(ridge.problem(rank, WORLD), hparams=nan_h, process_group=group)
    with pytest.raises(ValueError if rank == 1 else hg.RankFailedError):
        hg.Implicit()(problem)
    # and the group still works
    hg.Implicit()(dataclasses.replace(ridge.problem(rank, WORLD), process_group=group))


def test_configuration_fingerprint_is_canonical_and_sensitive():
    from hypergradient.distributed import config_fingerprint, plain_config

    a = {"solver": {"type": "CG", "maxiter": 10, "tol": 1e-6}, "damping": 0.0, "f": len}
    b = {"f": len, "damping": 0.0, "solver": {"tol": 1e-6, "maxiter": 10, "type": "CG"}}
    assert torch.equal(config_fingerprint(a), config_fingerprint(b))  # key order is irrelevant
    assert "0x" not in str(plain_config({"fn": lambda x: x, "obj": object()}))  # no addresses
    for changed in (
        {**a, "damping": 1e-300},
        {**a, "solver": {**a["solver"], "maxiter": 11}},
        {**a, "solver": {**a["solver"], "type": "Exact"}},
        {**a, "state": torch.tensor([1.0, 2.0])},
    ):
        assert not torch.equal(config_fingerprint(a), config_fingerprint(changed)), changed
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    same = torch.Generator().manual_seed(0)
    assert torch.equal(config_fingerprint({"g": g0}), config_fingerprint({"g": same}))
    assert not torch.equal(config_fingerprint({"g": g0}), config_fingerprint({"g": g1}))
    # a method's configuration covers its solver's settings
    one, other = hg.IFT(hg.Nystrom(seed=0)), hg.IFT(hg.Nystrom(seed=1))
    assert one.config() != other.config()
