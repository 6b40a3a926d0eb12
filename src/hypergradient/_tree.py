"""Trees of tensors: a tensor, a tuple/list of trees, or a dict of trees.

Parameters and hyperparameters arrive as any of these (``dict(model.named_parameters())``
included). The solvers work on one contiguous 1-D vector: every solver step is one BLAS-1
call, and flattening costs one copy per product, little next to its backward pass. This
module does the round trip and the validation, naming the offending leaf
(``params['fc.weight']``, ``hparams[1]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from . import _autograd
from ._vocab import ArgumentTypeError, as_scalar_loss

Tree = Union[Tensor, Sequence["Tree"], Mapping[str, "Tree"]]


@dataclass(frozen=True)
class TreeSpec:
    """Structure of a tree: how to rebuild it from its leaves, and where each leaf sits."""

    kind: str  # "leaf", "tuple", "list" or "dict"
    children: tuple[TreeSpec, ...] = ()
    keys: tuple[Any, ...] = ()
    paths: tuple[str, ...] = field(default=(), compare=False)
    shapes: tuple[torch.Size, ...] = ()

    @property
    def num_leaves(self) -> int:
        return len(self.shapes)

    @property
    def numels(self) -> list[int]:
        return list(self._numels)

    @property
    def size(self) -> int:
        return self._size

    @property
    def _numels(self) -> tuple[int, ...]:  # a spec is immutable: computed once
        cached = self.__dict__.get("_numels_value")
        if cached is None:
            cached = tuple(int(torch.Size(s).numel()) for s in self.shapes)
            object.__setattr__(self, "_numels_value", cached)
        return cached

    @property
    def _size(self) -> int:
        cached = self.__dict__.get("_size_value")
        if cached is None:
            cached = sum(self._numels)
            object.__setattr__(self, "_size_value", cached)
        return cached

    def structure(self) -> Any:
        """A hashable description ignoring shapes, to compare structures."""
        if self.kind == "leaf":
            return "leaf"
        return (self.kind, self.keys, tuple(c.structure() for c in self.children))


def _flatten(tree: Any, path: str, name: str, leaves: list[Tensor], paths: list[str]) -> TreeSpec:
    if isinstance(tree, Tensor):
        leaves.append(tree)
        paths.append(path)
        return _LEAF
    if isinstance(tree, Mapping):
        keys = tuple(tree.keys())
        children = tuple(_flatten(tree[k], f"{path}[{k!r}]", name, leaves, paths) for k in keys)
        return TreeSpec("dict", children, keys)
    if isinstance(tree, (tuple, list)):
        children = tuple(
            _flatten(t, f"{path}[{i}]", name, leaves, paths) for i, t in enumerate(tree)
        )
        return TreeSpec("tuple" if isinstance(tree, tuple) else "list", children)
    raise ArgumentTypeError(
        f"{path} is a {type(tree).__name__}; `{name}` must be a tensor, a tuple or list of "
        "tensors, or a dict of tensors (for a module: dict(model.named_parameters()))."
    )


_LEAF = TreeSpec("leaf")  # immutable: one instance serves every leaf


def flatten(tree: Tree, name: str) -> tuple[list[Tensor], TreeSpec]:
    """Leaves of ``tree`` in a fixed order, and the spec that rebuilds it.

    ``name`` is the argument's name, used in error messages.
    """
    kind = type(tree)
    if kind is tuple or kind is list:  # the usual case: a flat tuple or list of tensors
        leaves = list(tree)
        if all(isinstance(t, Tensor) for t in leaves):
            paths = tuple([f"{name}[{i}]" for i in range(len(leaves))])
            children = (_LEAF,) * len(leaves)
            return leaves, _spec(kind.__name__, children, (), paths, leaves)
    leaves = []
    found: list[str] = []
    spec = _flatten(tree, name, name, leaves, found)
    return leaves, _spec(spec.kind, spec.children, spec.keys, tuple(found), leaves)


def _spec(
    kind: str, children: tuple[TreeSpec, ...], keys: tuple, paths: tuple, leaves: list[Tensor]
) -> TreeSpec:
    """The spec of a flattened tree with its leaves' shapes and sizes (no per-field calls)."""
    out = object.__new__(TreeSpec)
    numels = tuple([t.numel() for t in leaves])
    out.__dict__.update(
        kind=kind,
        children=children,
        keys=keys,
        paths=paths,
        shapes=tuple([t.shape for t in leaves]),
        _numels_value=numels,
        _size_value=sum(numels),
    )
    return out


def unflatten(spec: TreeSpec, leaves: Sequence[Tensor]) -> Tree:
    """Inverse of :func:`flatten`."""
    kind = spec.kind
    if kind == "leaf":
        return leaves[0]
    if all(c is _LEAF for c in spec.children):  # one level (the usual case)
        if kind == "tuple":
            return tuple(leaves)
        return list(leaves) if kind == "list" else dict(zip(spec.keys, leaves))
    it = iter(leaves)

    def build(s: TreeSpec) -> Any:
        if s.kind == "leaf":
            return next(it)
        built = [build(c) for c in s.children]
        if s.kind == "dict":
            return dict(zip(s.keys, built))
        return tuple(built) if s.kind == "tuple" else built

    return build(spec)


def check_leaves(leaves: Sequence[Tensor], spec: TreeSpec, name: str) -> None:
    """Validate leaves: at least one, floating point, one device, one dtype family."""
    if not leaves:
        raise ValueError(f"`{name}` is empty; pass at least one tensor.")
    device = leaves[0].device
    for t, p in zip(leaves, spec.paths):
        if not t.is_floating_point():
            raise ArgumentTypeError(
                f"{p} has dtype {t.dtype}; hypergradients need real floating-point tensors. "
                "Convert it with .float() or .double()."
            )
        if t.device != device:
            raise ValueError(
                f"{p} is on {t.device} but {spec.paths[0]} is on {device}; move all of "
                f"`{name}` to one device."
            )


def common_dtype(leaves: Sequence[Tensor]) -> torch.dtype:
    dtype = leaves[0].dtype
    for t in leaves[1:]:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and norms read on the host; float32 on MPS, which has no float64."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.float32 if kind == "mps" else torch.float64


def accumulator_dtype(leaves: Sequence[Tensor]) -> torch.dtype:
    """The dtype of solver vectors: the leaves' common dtype, at least float32. Half-precision
    parameters keep their dtype inside each product, but the solvers' sums, inner products
    and iterates are float32: accumulating in 8 or 11 mantissa bits loses the solution."""
    dtype = common_dtype(leaves)
    return dtype if dtype in _WIDE_ENOUGH else torch.promote_types(dtype, torch.float32)


_WIDE_ENOUGH = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def cat(
    leaves: Sequence[Tensor | None],
    spec: TreeSpec,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """Concatenate leaves (``None`` meaning zeros) into one 1-D vector (always a new tensor)."""
    for t in leaves:  # the usual case: 1-D leaves of the dtype, all present
        if t is None or t.dtype != dtype or t.dim() != 1:
            break
    else:
        if leaves:
            return torch.cat(leaves)  # type: ignore[arg-type]
    if all(t is None for t in leaves):
        return torch.zeros(spec._size, dtype=dtype, device=device)
    parts = []
    for t, n in zip(leaves, spec._numels):
        if t is None:
            parts.append(torch.zeros(n, dtype=dtype, device=device))
        else:
            t = t if t.dim() == 1 else t.reshape(-1)
            parts.append(t if t.dtype == dtype else t.to(dtype))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


def split(vec: Tensor, spec: TreeSpec, dtypes: Sequence[torch.dtype] | None = None) -> list[Tensor]:
    """Views of a 1-D vector (or of the last dim of a batch) shaped like the leaves."""
    lead = tuple(vec.shape[:-1])
    out = []
    # split_with_sizes: the views torch.split makes, without its symbolic-shape checks
    pieces = vec.split_with_sizes(spec.numels, dim=-1)
    for i, (piece, shape) in enumerate(zip(pieces, spec.shapes)):
        if lead or len(shape) != 1:
            piece = piece.reshape(lead + tuple(shape))
        if dtypes is not None and piece.dtype != dtypes[i]:
            piece = piece.to(dtypes[i])
        out.append(piece)
    return out


def _relative(spec: TreeSpec, name: str) -> list[str]:
    return [p[len(name) :] for p in spec.paths]


def mismatch(got: TreeSpec, got_name: str, want: TreeSpec, want_name: str) -> str | None:
    """How the tree ``got`` differs from ``want`` in words (keys, kinds, shapes), or None.

    Names the keys one has and the other lacks (``missing x0['b']; unexpected x0['c']``),
    else the first leaf whose shape differs, else the container kinds.
    """
    have, need = _relative(got, got_name), _relative(want, want_name)
    has, needs = set(have), set(need)  # (membership in the lists: quadratic in the leaves)
    missing = [got_name + p for p in need if p not in has]
    extra = [got_name + p for p in have if p not in needs]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append("unexpected " + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
        return "; ".join(parts)
    for p, a, b in zip(have, got.shapes, want.shapes):
        if tuple(a) != tuple(b):
            return f"{got_name}{p} has shape {tuple(a)} where {want_name}{p} has shape {tuple(b)}"
    if got.structure() != want.structure():
        return f"`{got_name}` nests its leaves in other containers than `{want_name}`"
    return None


def as_flat(
    x: Tree | Tensor,
    spec: TreeSpec,
    name: str,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """Accept either a 1-D vector of the right size or a tree matching ``spec`` (``params``)."""
    flat_vector = isinstance(x, Tensor) and x.dim() == 1 and x.numel() == spec.size
    if isinstance(x, Tensor) and (spec.kind != "leaf" or flat_vector):
        if not flat_vector:
            raise ValueError(
                f"`{name}` has shape {tuple(x.shape)}; pass a 1-D vector of {spec.size} "
                "elements or a tree with the structure of `params`."
            )
        return x.detach().to(dtype=dtype, device=device)
    leaves, xspec = flatten(x, name)
    problem = mismatch(xspec, name, spec, spec.paths[0].split("[")[0] if spec.paths else "params")
    if problem is not None:
        raise ValueError(f"`{name}` does not match the structure of `params`: {problem}.")
    return cat([t.detach() for t in leaves], spec, dtype, device)


def grad_at(
    fn: Callable[..., Tensor],
    trees: Sequence[Tree],
    names: Sequence[str],
    loss_name: str,
    *,
    create_graph: bool = False,
    by_reference: Sequence[bool] = (),
) -> tuple[Tensor, list[list[Tensor | None]]]:
    """Gradient of the scalar ``fn(*trees)`` with respect to every leaf of every tree.

    The one implementation of "the gradient of a loss at a point": each tree's leaves are
    replaced by fresh leaves that require grad (the caller's tensors are never modified and
    their ``.grad`` is untouched), ``fn`` is evaluated once, and one backward pass returns
    the gradients. A leaf the loss does not use gets ``None`` (the caller decides whether
    that means zero or "unused"). ``names`` are the trees' argument names for messages.
    ``by_reference[i]``: use tree ``i``'s own leaves (tensors with ``requires_grad=True``,
    for a loss that reads them by reference rather than through its argument); only
    ``autograd.grad`` reads them, so their ``.grad`` stays untouched.

    Returns:
        ``(value, grads)``: the loss (detached unless ``create_graph``) and, per tree, the
        list of its leaves' gradients (with the graph kept when ``create_graph``).
    """
    flat = [flatten(tree, name) for tree, name in zip(trees, names)]
    return grad_at_leaves(
        fn,
        [leaves for leaves, _ in flat],
        [spec for _, spec in flat],
        loss_name,
        create_graph=create_graph,
        by_reference=by_reference,
    )


def grad_at_leaves(
    fn: Callable[..., Tensor],
    leaves: Sequence[Sequence[Tensor]],
    specs: Sequence[TreeSpec],
    loss_name: str,
    *,
    create_graph: bool = False,
    by_reference: Sequence[bool] = (),
) -> tuple[Tensor, list[list[Tensor | None]]]:
    """:func:`grad_at` with the trees given flattened (their leaves and specs)."""
    fresh: list[list[Tensor]] = []
    as_is = list(by_reference) + [False] * (len(leaves) - len(by_reference))
    for tree_leaves, own in zip(leaves, as_is):
        fresh.append(
            list(tree_leaves) if own else [t.detach().requires_grad_(True) for t in tree_leaves]
        )
    with torch.enable_grad():
        value = as_scalar_loss(fn(*(unflatten(s, f) for s, f in zip(specs, fresh))), loss_name)
        flat = [t for f in fresh for t in f]
        if not value.requires_grad or not flat:
            grads: Sequence[Tensor | None] = [None] * len(flat)
        else:
            paths = [p for s in specs for p in s.paths]
            grads = dense_grad(value, flat, loss_name, paths, create_graph=create_graph)
    out: list[list[Tensor | None]] = []
    i = 0
    for f in fresh:
        out.append(list(grads[i : i + len(f)]))
        i += len(f)
    return (value if create_graph else value.detach()), out


_SPARSE_FIX = (
    "hypergradients need second derivatives, which torch does not propagate through sparse "
    "gradients. Build the module with sparse=False (the same gradient, dense)."
)


def require_dense(grads: Sequence[Tensor | None], paths: Sequence[str], loss_name: str) -> None:
    """Refuse sparse gradients (``nn.Embedding(sparse=True)``), naming the leaf: torch does
    not differentiate through them (an internal error, or an unrolled step that silently
    drops the embedding's second-order terms: a hypergradient 0.0016 instead of 0.066)."""
    for g, path in zip(grads, paths):
        if g is not None and g.layout != torch.strided:
            raise ValueError(
                f"The gradient of {loss_name} with respect to {path} is a sparse tensor "
                f"({g.layout}; nn.Embedding or nn.EmbeddingBag with sparse=True): " + _SPARSE_FIX
            )


def dense_grad(
    loss: Tensor, inputs: Sequence[Tensor], loss_name: str, paths: Sequence[str], **kw: Any
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, allow_unused=True, **kw)``, sparse refused."""
    with dense_gradients(loss_name):  # (retain_graph: torch's default; _autograd.grad: faster)
        grads = _autograd.grad((loss,), inputs, retain_graph=kw.get("create_graph", False), **kw)
    require_dense(grads, paths, loss_name)
    return grads


@contextlib.contextmanager
def dense_gradients(loss_name: str) -> Iterator[None]:
    """Torch's errors on sparse gradients in a graph (``add(sparse, dense)``) as a
    ``ValueError`` naming the cause and the fix."""
    try:
        yield
    except RuntimeError as error:
        if "sparse" not in str(error).lower():
            raise
        raise ValueError(
            f"The gradient of {loss_name} has a sparse part (nn.Embedding or "
            f"nn.EmbeddingBag with sparse=True; torch: {error}): " + _SPARSE_FIX
        ) from error
