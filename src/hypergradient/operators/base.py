"""Linear operators on flat vectors: the interface, an explicit matrix, and a damped shift."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import ArgumentTypeError

__all__ = [
    "DampedOperator",
    "LinearOperator",
    "WrappingOperator",
    "MatrixOperator",
    "check_operand",
    "check_vector",
    "same_device",
]


class LinearOperator:
    """A square linear operator acting on 1-D tensors of length ``size``.

    Subclasses implement ``_matvec`` (and may override ``_matmat``). ``num_matvecs``
    counts every product taken, batched ones included.

    Attributes:
        size: dimension n of the operator (the number of parameters).
        dtype, device: of the vectors it acts on.
        symmetric: whether the operator is symmetric (CG and Nystrom require it).
    """

    symmetric: bool = True

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str):
        self.size = size if type(size) is int and size >= 0 else _vocab.as_int(size, "size", min=0)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentTypeError(
                f"`dtype` must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}."
            )
        self.dtype = dtype
        self.device = device if type(device) is torch.device else torch.device(device)
        self.num_matvecs = 0

    @property
    def differenced(self) -> bool:
        """Whether the products are finite differences of gradients (``mode ==
        "first_order"``), here or in the wrapped operator."""
        base = getattr(self, "base", None) or getattr(self, "op", None)
        if isinstance(base, LinearOperator):
            return base.differenced
        return getattr(self, "mode", None) == "first_order"

    @property
    def product_eps(self) -> float:
        """Relative precision of the products: the machine epsilon of ``dtype``, of the
        least precise parameter (half-precision models) or of the autocast dtype the
        operator was built under, or the wrapped operator's. Finite-difference products
        (``mode == "first_order"``) are accurate to about ``eps^(2/3)`` of the parameters'
        least precise dtype (:func:`~hypergradient.operators.modes.first_order_step`): 2.4e-5
        in float32, 3.7e-11 in float64."""
        base = getattr(self, "base", None) or getattr(self, "op", None)
        if isinstance(base, LinearOperator):
            return base.product_eps
        params = getattr(self, "param_leaves", ())
        dtypes = {self.dtype, *(t.dtype for t in params)}
        autocast = getattr(self, "autocast_dtype", None)
        if isinstance(autocast, torch.dtype):
            dtypes.add(autocast)
        eps = max(torch.finfo(d).eps for d in dtypes)
        if self.differenced:
            eps = max(eps, max(torch.finfo(t.dtype).eps for t in params) ** (2.0 / 3.0))
        return eps

    # -- products -------------------------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(v) for v in V])

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a 1-D floating-point ``v`` of ``size`` elements; one product.

        Raises:
            ArgumentTypeError: ``v`` is not a floating-point tensor.
            ValueError: ``v`` is not 1-D with ``size`` elements (nothing is counted).
        """
        if not (
            isinstance(v, Tensor)
            and v.dim() == 1
            and v.shape[0] == self.size
            and v.is_floating_point()
        ):
            check_vector(v, self.size, "v")
        self.num_matvecs += 1
        return self._matvec(v)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        """Products with each row of ``V`` (shape ``(k, n)``), returned as rows ``(k, n)``.

        ``chunk_size`` bounds how many products are evaluated at once (memory grows
        linearly with it); ``None`` does all ``k`` together.
        """
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[1] != self.size:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(f"matmat expects a (k, {self.size}) tensor, got {shape}")
        if not V.is_floating_point():
            raise ArgumentTypeError(f"matmat expects a floating-point tensor, got {V.dtype}.")
        chunk_size = _vocab.as_optional_int(chunk_size, "chunk_size", min=1)
        k = V.shape[0]
        self.num_matvecs += k
        if k == 0:
            return V.clone()
        step = k if chunk_size is None else chunk_size
        return torch.cat([self._matmat(V[i : i + step]) for i in range(0, k, step)])

    def dense(self, chunk_size: int | None = None) -> Tensor:
        """Materialize the operator as an ``(n, n)`` matrix; costs ``n`` products."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self.matmat(eye, chunk_size).T.contiguous()


class MatrixOperator(LinearOperator):
    """An explicit matrix as an operator (tests, small problems, preconditioners).

    Args:
        matrix: a square floating-point tensor.
        symmetric: whether to treat it as symmetric; ``None`` tests it (relative to its
            largest finite entry; NaN/Inf entries do not make it non-symmetric, so that a
            solver meets them in its products and reports them).
    """

    def __init__(self, matrix: Tensor, symmetric: bool | None = None):
        if not isinstance(matrix, Tensor):
            raise ArgumentTypeError(f"`matrix` must be a tensor, got {type(matrix).__name__}.")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise ArgumentTypeError(f"`matrix` must be floating point, got {matrix.dtype}.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        if symmetric is None:
            symmetric = _is_symmetric(matrix)
        self.symmetric = _vocab.as_bool(symmetric, "symmetric")

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return V @ self.matrix.T


def check_vector(v: object, size: int, name: str) -> None:
    """Raise unless ``v`` is a 1-D floating-point tensor of ``size`` elements.

    Raises:
        ArgumentTypeError: ``v`` is not a tensor, or not floating point.
        ValueError: ``v`` has another shape.
    """
    if not isinstance(v, Tensor):
        raise ArgumentTypeError(
            f"`{name}` must be a 1-D tensor of {size} elements, got {type(v).__name__}."
        )
    if v.dim() != 1 or v.shape[0] != size:
        raise ValueError(
            f"`{name}` must be a 1-D tensor of {size} elements (one per parameter), got shape "
            f"{tuple(v.shape)}."
        )
    if not v.is_floating_point():
        raise ArgumentTypeError(f"`{name}` must be a floating-point tensor, got {v.dtype}.")


def check_operand(name: str, t: object, op: LinearOperator) -> None:
    """Raise unless ``t`` (a solver's ``b`` or ``x0``) is a 1-D floating-point tensor of
    ``op``'s size and device; ``b`` also of its dtype (the products would fail in torch,
    naming nothing; a warm start is converted).

    Raises:
        ArgumentTypeError: not a floating-point tensor, or ``b`` of another dtype.
        ValueError: another shape or device.
    """
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"`{name}` must be a tensor, got {type(t).__name__}.")
    if t.dim() != 1 or t.numel() != op.size:
        raise ValueError(
            f"`{name}` must be a 1-D tensor of {op.size} elements, got {tuple(t.shape)}."
        )
    if not t.is_floating_point():
        raise ArgumentTypeError(f"`{name}` must be floating point, got {t.dtype}.")
    if t.device != op.device and not same_device(t.device, op.device):
        raise ValueError(
            f"`{name}` is on {t.device} but the operator on {op.device}; move it there."
        )
    if name == "b" and t.dtype != op.dtype:
        raise ArgumentTypeError(
            f"`b` has dtype {t.dtype} but the operator acts on {op.dtype} vectors; "
            "pass b.to(op.dtype)."
        )


def same_device(a: torch.device, b: torch.device | str) -> bool:
    """One device (``cuda`` and ``cuda:0`` alike: an operator may name no index)."""
    b = torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _is_symmetric(matrix: Tensor) -> bool:
    """Symmetric up to ``100 eps max|a_ij|`` on the finite entries (scale-invariant)."""
    if matrix.numel() == 0:
        return True
    finite = torch.isfinite(matrix) & torch.isfinite(matrix.T)
    safe = torch.where(finite, matrix, torch.zeros_like(matrix))
    tol = 100 * torch.finfo(matrix.dtype).eps * float(safe.abs().max())
    return bool((safe - safe.T).abs().max() <= tol)


class WrappingOperator(LinearOperator):
    """An operator built on ``self.base``, whose products are counted there: its
    ``num_matvecs`` is the wrapped operator's (a product of a damped, averaged, projected
    or recording operator is one product of ``base``)."""

    base: LinearOperator

    @property
    def num_matvecs(self) -> int:
        """The wrapped operator's count of products."""
        return self.base.num_matvecs

    @num_matvecs.setter
    def num_matvecs(self, value: int) -> None:  # LinearOperator.__init__ sets it
        pass


class DampedOperator(WrappingOperator):
    """``A + damping * I``. Products are counted on the wrapped operator.

    Args:
        base: the operator ``A``.
        damping: the shift, a finite number >= 0.
    """

    def __init__(self, base: LinearOperator, damping: float):
        if not isinstance(base, LinearOperator):
            raise ArgumentTypeError(f"`base` must be a LinearOperator, got {type(base).__name__}.")
        damping = _vocab.as_float(damping, "damping", min=0.0)
        super().__init__(base.size, base.dtype, base.device)
        self.base = base
        self.damping = damping
        self.symmetric = base.symmetric

    def matvec(self, v: Tensor) -> Tensor:
        return self.base.matvec(v) + self.damping * v

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        return self.base.matmat(V, chunk_size) + self.damping * V
