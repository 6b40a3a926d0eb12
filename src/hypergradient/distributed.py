"""Data-parallel hypergradients through ``torch.distributed``.

Each rank holds one shard of the data; its ``inner_loss`` and ``outer_loss`` are means over
that shard, and the global objectives are their averages over the ranks (equal-sized
shards). Everything the solvers see is then a global quantity obtained by averaging with
collective operations:

- the right-hand side ``grad_theta g`` and the direct term ``d_phi g``: one all-reduce;
- every Hessian-vector product ``H v = mean_r H_r v``: one all-reduce per product (a batch
  of products, as in a Nystrom sketch, is one all-reduce);
- the mixed product ``(d_phi grad_theta f)^T x``: one all-reduce.

The solvers are deterministic given identical inputs, so every rank runs the same
iterations and ends with the same hypergradient, bit for bit. Three functions make this
safe by construction:

- :func:`check_consistent` (the first collective of every method): one fixed-size
  all-reduce compares fingerprints of the values (hyperparameters, parameters) *and* of the
  whole configuration (method, solver and its generator state, damping, steps, optimizer
  settings), so a rank with another seed, learning rate or solver raises instead of
  silently diverging or aborting inside the backend on a collective of another size;
- :func:`guarded` (every later collective): a rank whose local computation raises (a loss
  that fails on its shard) still joins the collective with a failure flag, so every rank
  raises at once instead of waiting for the backend's timeout;
- :func:`mean_over_ranks`: pack, all-reduce, unpack (the one implementation).

Any backend works (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._tree import wide_dtype
from ._vocab import RankFailedError
from .operators import LinearOperator, WrappingOperator

__all__ = [
    "AveragedOperator",
    "all_reduce_mean",
    "any_rank",
    "check_consistent",
    "config_fingerprint",
    "group_size",
    "guarded",
    "mean_over_ranks",
    "plain_config",
]

#: Value groups one consistency check compares (fixed, so that every rank's collective has
#: the same size whatever it checks: a rank running another method cannot abort the backend).
MAX_CHECKS = 6
_WIDTH = 6  # numbers per fingerprint


def group_size(group: Any) -> int:
    """The number of ranks in ``group``; raises ``ValueError`` if it cannot be used here."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "`process_group` was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first (e.g. under torchrun)."
        )
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"This process (global rank {dist.get_rank()}) is not a member of "
            "`process_group`; pass a group that contains every rank that calls this function."
        )
    return dist.get_world_size(group)


_group_size = group_size  # transitional name for the driver (use `group_size`)


def all_reduce_mean(tensor: Tensor, group: Any) -> Tensor:
    """Average ``tensor`` over the ranks of ``group`` (in place; returns it)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    tensor.div_(group_size(group))
    return tensor


def _pack(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    wide = wide_dtype(device)
    if not tensors:
        return torch.zeros(0, dtype=wide, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=wide) for t in tensors])


def _unpack(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        i += t.numel()
    return out


def mean_over_ranks(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Average several tensors over the ranks with one all-reduce (the one implementation).

    The tensors are packed into one buffer of the widest float type (float64, float32 on
    MPS), averaged, and unpacked to their shapes and dtypes. With ``group=None`` they are
    returned unchanged.
    """
    tensors = list(tensors)
    if group is None or not tensors:
        return tensors
    flat = all_reduce_mean(_pack(tensors, tensors[0].device), group)
    return _unpack(flat, tensors)


def any_rank(flag: bool, group: Any, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (one all-reduce; ``flag`` itself
    without a group), so that every rank takes the same decision."""
    if group is None:
        return flag
    mean = mean_over_ranks([torch.tensor([float(flag)], device=device)], group)[0]
    return float(mean) > 0.0


def _raise_if_failed(failures: float, error: BaseException | None, what: str) -> None:
    if error is not None:
        raise error
    if failures > 0:
        raise RankFailedError(
            f"{int(round(failures))} other rank(s) failed while computing {what}; their "
            "error is raised there. Every rank stops here instead of waiting for them."
        )


def guarded(
    fn: Callable[[], Sequence[Tensor]],
    like: Sequence[Tensor],
    group: Any,
    what: str = "the hypergradient",
) -> list[Tensor]:
    """``mean_over_ranks(fn(), group)``, safe when ``fn`` raises on some ranks only.

    A rank whose ``fn`` raises joins the same all-reduce with zeros shaped like ``like`` and
    a failure flag (one more number in the buffer); then every rank raises: the failing one
    its own error, the others :class:`~hypergradient.RankFailedError`. Without a group,
    ``fn()`` is returned as it is.

    Args:
        fn: the local computation; returns tensors shaped like ``like``.
        like: tensors with the shapes, dtypes and device of ``fn``'s results (only their
            metadata is read).
        group: a ``torch.distributed`` group, or None.
        what: what is being computed, for the other ranks' message.
    """
    if group is None:
        return list(fn())
    error: BaseException | None = None
    try:
        local = list(fn())
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the collective
        error, local = exc, [torch.zeros_like(t) for t in like]
    if error is None and [t.numel() for t in local] != [t.numel() for t in like]:
        error = RuntimeError(f"guarded: the local result does not match `like` for {what}.")
        local = [torch.zeros_like(t) for t in like]
    device = like[0].device if like else torch.device("cpu")
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=wide_dtype(device), device=device)
    *out, failed = mean_over_ranks([*local, flag], group)  # one all-reduce, flag included
    _raise_if_failed(float(failed) * group_size(group), error, what)
    return out


# ----------------------------------------------------------------------------- fingerprints


def _fingerprint(values: Sequence[Tensor], device: torch.device) -> Tensor:
    """Six float64 numbers that differ, in practice, when ``values`` differ.

    Leaf count, total size, and per-leaf size (with a dtype code), sum, sum of squares and
    position-weighted sum, each summed with the leaf's index as weight (so swapping leaves
    changes it).
    Non-finite entries map to fixed sentinels, so equal NaNs compare equal.
    """
    fp = torch.zeros(_WIDTH, dtype=torch.float64, device=device)
    fp[0] = float(len(values))
    for i, v in enumerate(values, start=1):
        x = v.detach().to(device=device, dtype=torch.float64).reshape(-1)
        w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=device)
        fp[1] += x.numel()
        fp[2] += i * (x.numel() + _dtype_code(v.dtype) * 2.0**40)  # exact below 2^53
        fp[3] += i * x.sum()
        fp[4] += i * (x * x).sum()
        fp[5] += i * (w * x).sum()
    return torch.nan_to_num(fp, nan=1.0e300, posinf=1.1e300, neginf=-1.1e300)


def _dtype_code(dtype: torch.dtype) -> int:
    """A small integer per dtype, the same in every process (a float32 leaf on one rank and
    a float64 one on another holding the same values are different structures)."""
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else len(_DTYPES) + 1


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _tensor_digest(t: Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1)
    data = raw.view(torch.uint8) if raw.numel() else raw.to(torch.uint8)
    return hashlib.sha256(bytes(data.numpy().tobytes())).hexdigest()[:32]


def plain_config(obj: Any) -> Any:
    """``obj`` as canonical plain data (for a fingerprint): no addresses, no float rounding.

    Dicts are sorted by key, floats become their ``repr`` (so NaN and -0.0 survive), tensors
    and generator states a digest of their bytes, objects with ``config()`` their type and
    config, callables their qualified name, anything else its type name.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): plain_config(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    if isinstance(obj, Tensor):
        return {"tensor": str(obj.dtype), "shape": list(obj.shape), "bytes": _tensor_digest(obj)}
    if isinstance(obj, torch.Generator):
        return {"generator": _tensor_digest(obj.get_state())}
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if callable(getattr(obj, "config", None)):
        return {"type": type(obj).__name__, "config": plain_config(obj.config())}
    if callable(obj):
        return getattr(obj, "__qualname__", type(obj).__name__)
    return type(obj).__name__


def config_fingerprint(config: Any, device: torch.device | str = "cpu") -> Tensor:
    """Six float64 numbers from a SHA-256 of the canonical JSON of ``config``.

    Each is a 40-bit slice of the digest, exactly representable, so equal configurations
    give equal numbers on every rank and different ones differ (with probability
    ``1 - 2^-240``).
    """
    text = json.dumps(plain_config(config), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).digest()
    nums = [float(int.from_bytes(digest[5 * i : 5 * i + 5], "big")) for i in range(_WIDTH)]
    return torch.tensor(nums, dtype=torch.float64, device=device)


#: Top-level entries of a configuration named when it differs between ranks.
_KEYS = 64


def _differing_keys(config: Any, group: Any, device: torch.device) -> list[str]:
    """The top-level keys of a ``config`` dict whose values differ between ranks (one more
    all-reduce, taken on every rank once the fingerprints differ: the same verdict on
    each). The message said only "the configuration differs" (``inner_steps=4`` on one
    rank, 5 on the other), listing every kind of setting it might be."""
    if not isinstance(config, Mapping):
        return []
    keys = sorted(map(str, config))[:_KEYS]
    vec = torch.zeros(_KEYS, dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        vec[i] = config_fingerprint({key: config[key]}, device)[0]
    both = torch.cat([vec, -vec])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    read = both.tolist()  # (largest, minus smallest)
    return [k for i, k in enumerate(keys) if read[i] != -read[_KEYS + i]]


def _verdict(names: list[str], hi: Tensor, lo: Tensor, differing: Sequence[str] = ()) -> None:
    for i, name in enumerate(names):
        if not torch.equal(hi[i, :3], lo[i, :3]):
            raise ValueError(
                f"{name} have different structures on different ranks; every rank must pass "
                "the same structure, shapes and dtypes."
            )
        if not torch.equal(hi[i], lo[i]):
            raise ValueError(
                f"{name} differ between ranks; every rank must pass identical values "
                "(broadcast them from rank 0 with torch.distributed.broadcast before the call)."
            )
    if not torch.equal(hi[MAX_CHECKS], lo[MAX_CHECKS]):
        where = f" in {', '.join(differing)}" if differing else ""
        raise ValueError(
            f"The configuration differs between ranks{where} (method, solver settings, the "
            "solver's seed or generator state, damping, steps, learning rate, the inner or outer "
            "optimizer's settings or state): every rank must build the same method with the "
            "same settings and seed (e.g. hg.Nystrom(seed=0) on every rank, not seed=rank; "
            "a solver without a seed, such as hg.IFT()'s default series, draws its start "
            "from torch's global generator, which differs on ranks seeded differently: "
            "pass seed=0)."
        )


def check_consistent(
    values: Sequence[Tensor],
    group: Any,
    what: str,
    *more: tuple[Sequence[Tensor], str],
    config: Any = None,
    error: BaseException | None = None,
) -> None:
    """Raise on every rank if ``values`` or ``config`` differ between ranks.

    ``more`` adds further ``(values, what)`` pairs (at most ``MAX_CHECKS`` in all). Each is
    reduced to a fixed-size fingerprint, ``config`` (plain data: method and solver settings,
    generator states, steps, optimizer settings) to a hash (:func:`config_fingerprint`);
    one all-reduce of ``[fp, -fp, failed]`` with ``MAX`` gives every rank the largest and
    smallest fingerprint of the group, so every rank reaches the same verdict, and no rank
    waits for a collective another skipped. The buffer has the same size whatever is
    checked.

    ``error``: this rank's preparation failed (bad input on this rank only); it still joins
    the collective, then raises ``error`` while the others raise
    :class:`~hypergradient.RankFailedError`.
    """
    checks = [(list(values), what), *((list(v), w) for v, w in more)]
    if len(checks) > MAX_CHECKS:
        raise ValueError(f"check_consistent compares at most {MAX_CHECKS} groups of values.")
    device = next((v[0].device for v, _ in checks if v), torch.device("cpu"))
    if device.type == "mps":  # fingerprints are float64
        device = torch.device("cpu")
    fp = torch.zeros(MAX_CHECKS + 1, _WIDTH, dtype=torch.float64, device=device)
    if error is None:
        for i, (v, _) in enumerate(checks):
            fp[i] = _fingerprint(v, device)
        fp[MAX_CHECKS] = config_fingerprint(config, device)
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=device)
    both = torch.cat([fp.reshape(-1), -fp.reshape(-1), flag])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    _raise_if_failed(float(both[-1]), error, "their inputs")
    n = fp.numel()
    hi, lo = both[:n].reshape(fp.shape), -both[n : 2 * n].reshape(fp.shape)
    only_config = torch.equal(hi[:MAX_CHECKS], lo[:MAX_CHECKS])  # (the same on every rank)
    if only_config and not torch.equal(hi[MAX_CHECKS], lo[MAX_CHECKS]):
        differing = _differing_keys(config, group, device)
    else:
        differing = []
    _verdict([name for _, name in checks], hi, lo, differing)


class AveragedOperator(WrappingOperator):
    """``v -> mean over ranks of A_r v``: one guarded all-reduce per product (or batch)."""

    def __init__(self, base: LinearOperator, group: Any):
        super().__init__(base.size, base.dtype, base.device)
        self.base = base
        self.group = group
        self.symmetric = base.symmetric

    def matvec(self, v: Tensor) -> Tensor:
        return guarded(lambda: [self.base.matvec(v)], [v], self.group, "a Hessian product")[0]

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        return guarded(
            lambda: [self.base.matmat(V, chunk_size)], [V], self.group, "Hessian products"
        )[0]
