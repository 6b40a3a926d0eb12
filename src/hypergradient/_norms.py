"""Norms of large float32 vectors read by float32 rows: a third of a float64 norm's time.

A float64 norm of a float32 vector converts every entry; summing at most :data:`ROW`
squares per row in float32 and combining the row norms in float64 reads the vector once,
to a few float32 roundings (about 1e-7 relative). Solvers, the T1T2 direct path, the
implicit formula's checks and the Hessian operator's sampled scale read their norms this way
from :data:`ROWS_FROM` entries, and exactly (:func:`~hypergradient.solvers.base.safe_norm`,
:func:`exact_where_off`) wherever this may be more than a rounding off. Layer 0: torch only,
so that operators use it as well as solvers and methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ROW",
    "ROWS_FROM",
    "ROW_SQUARES",
    "exact_where_off",
    "host_floats",
    "in_rows",
    "norm_parts",
    "read_exactly",
    "read_floats",
    "row_norms",
    "wide_norm",
]

#: Float32 vectors of at least this many entries may have their norms read by rows.
ROWS_FROM = 1 << 15
#: Entries per float32 row: at most ``ROW`` squares are summed in float32.
ROW = 256
_F32 = torch.finfo(torch.float32)
#: Below ``sqrt(n)`` times this, float32 squares underflow by more than a rounding.
ROW_SQUARES = math.sqrt(_F32.tiny / _F32.eps)


def host_floats(values: Sequence[Tensor]) -> list[float] | None:
    """0-d floating-point CPU tensors as Python floats, each read as it is; None when one is
    not such a tensor (the caller then stacks them: one host synchronization).

    The same numbers as ``torch.stack([v.to(wide) for v in values]).tolist()`` (a widening
    conversion is exact), without the stack and the conversions, which a CPU read does not
    need: four float64 values and a float32 one read in 7 us instead of 15."""
    out = []
    for v in values:
        if not (v.is_cpu and v.ndim == 0 and v.dtype.is_floating_point):
            return None
        out.append(v.item())
    return out


def read_floats(values: Sequence[Tensor], device: torch.device, wide: torch.dtype) -> list[float]:
    """0-d values as Python floats: :func:`host_floats` where it applies, else one stacked
    read in ``wide`` on ``device`` (one host synchronization). Exact either way."""
    read = host_floats(values)
    return read if read is not None else torch.stack([v.to(device, wide) for v in values]).tolist()


def in_rows(t: Tensor, wide: torch.dtype) -> bool:
    """Whether :func:`norm_parts` reads ``t`` by float32 rows."""
    return (
        t.dtype == torch.float32
        and wide == torch.float64
        and t.numel() >= ROWS_FROM
        and t.is_contiguous()
    )


def norm_parts(t: Tensor, wide: torch.dtype) -> list[Tensor]:
    """0-d tensors in ``wide`` whose Euclidean combination is ``||t||``.

    A contiguous float32 ``t`` of at least :data:`ROWS_FROM` entries is read once in
    float32: one norm per row of :data:`ROW` entries (at most ``ROW`` squares summed in
    float32: a relative error of a few float32 roundings, about 1e-7, where float64 gives
    1e-16), the row norms combined in ``wide``, the remainder in ``wide``. Any other ``t``
    is normed in ``wide``. Squares below float32's range (entries under ~1e-19) underflow
    there: callers treat norms below ``sqrt(n) ROW_SQUARES`` as unread (:func:`row_norms`).
    """
    if not in_rows(t, wide):
        return [torch.linalg.vector_norm(t, dtype=wide)]
    n = t.numel()
    flat, m = t.view(-1), n - n % ROW
    rows = torch.linalg.vector_norm(flat[:m].view(-1, ROW), dim=1)
    parts = [torch.linalg.vector_norm(rows, dtype=wide)]
    if m < n:
        parts.append(torch.linalg.vector_norm(flat[m:], dtype=wide))
    return parts


def row_norms(vectors: tuple[Tensor, ...], wide: torch.dtype) -> list[float] | None:
    """``[||v|| for v in vectors]`` read by :func:`norm_parts` with one synchronization, or
    None where one of them may be more than a few float32 roundings off (not finite, or
    below ``sqrt(n) ROW_SQUARES``): the caller then reads them exactly. Cost: one pass over
    each vector, no copy of one (vectors of one length, each read by rows: the row norms,
    and the remainders, of all of them stacked and combined by one call each, which gives
    the bits :func:`norm_parts` gives; 12 reductions of CG's 4 vectors at 2e5 entries took
    0.4-0.5 ms, these 6 0.2-0.35 ms)."""
    n = vectors[0].numel()
    if len(vectors) > 1 and all(v.numel() == n and in_rows(v, wide) for v in vectors):
        read = _stacked_parts(vectors, n - n % ROW, wide)
        k = len(vectors)
        out = [math.hypot(read[i], read[i + k]) for i in range(k)] if len(read) > k else read
    else:
        counts, parts = [], []
        for v in vectors:
            got = norm_parts(v, wide)
            counts.append(len(got))
            parts.extend(got)
        read, out, i = torch.stack(parts).tolist(), [], 0
        for c in counts:
            out.append(read[i] if c == 1 else math.hypot(*read[i : i + c]))
            i += c
    for v, value in zip(vectors, out):
        if not math.sqrt(v.numel()) * ROW_SQUARES <= value < math.inf:  # NaN fails too
            return None
    return out


def _stacked_parts(vectors: tuple[Tensor, ...], m: int, wide: torch.dtype) -> list[float]:
    """:func:`norm_parts` of ``vectors`` (contiguous float32, one length, ``m`` of it in
    whole rows), read at once: the float32 row norms of each, stacked, combined in ``wide``
    per vector by one call, and (when there is a remainder) the remainders likewise:
    ``[rows_0, ..., rows_k-1, rest_0, ..., rest_k-1]``. A reduction along each row of a
    stacked tensor adds in the order of the one of a vector alone (the same bits, checked
    at 1, 2 and 4 threads in ``tests/test_norms_rows.py``)."""
    rows = torch.stack([torch.linalg.vector_norm(v[:m].view(-1, ROW), dim=1) for v in vectors])
    parts = [torch.linalg.vector_norm(rows, dim=1, dtype=wide)]
    if m < vectors[0].numel():
        rest = torch.stack([v[m:] for v in vectors])
        parts.append(torch.linalg.vector_norm(rest, dim=1, dtype=wide))
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()


def wide_norm(t: Tensor, wide: torch.dtype) -> Tensor:
    """``||t||`` as an unread 0-d tensor in ``wide``: :func:`norm_parts` combined on the
    device (no float64 copy of a large float32 vector: 0.15-0.6 ms each at 2e5 entries).
    Its reader replaces a value :func:`read_exactly` flags by the exact norm."""
    if t.numel() < ROWS_FROM:  # (the usual small vector: no further call)
        return torch.linalg.vector_norm(t, dtype=wide)
    parts = norm_parts(t, wide)
    return parts[0] if len(parts) == 1 else torch.hypot(parts[0], parts[1])


def read_exactly(value: float, t: Tensor, wide: torch.dtype) -> bool:
    """Whether ``value``, read from :func:`wide_norm` of ``t``, may be more than a few
    float32 roundings off (read by rows, and not finite or below ``sqrt(n) ROW_SQUARES``),
    so that the exact norm ``vector_norm(t, dtype=wide)`` must be read instead."""
    return in_rows(t, wide) and not math.sqrt(t.numel()) * ROW_SQUARES <= value < math.inf


def exact_where_off(
    values: list[float], read: Iterable[tuple[int, Tensor]], wide: torch.dtype
) -> None:
    """``values[i]`` read from :func:`wide_norm` of ``t``, for each ``(i, t)`` of ``read``,
    replaced by the exact norm (of ``t`` detached) where :func:`read_exactly`."""
    for i, t in read:
        if t.numel() >= ROWS_FROM and read_exactly(values[i], t, wide):
            values[i] = float(torch.linalg.vector_norm(t.detach(), dtype=wide))
