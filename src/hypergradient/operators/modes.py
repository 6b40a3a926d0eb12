"""How an operator answers products: the product modes and what they need.

=================  ==============================================================  =========
mode               product ``H v``                                                 cost
=================  ==============================================================  =========
``"double"``       backward through the retained graph of ``grad f``                ~1 grad
``"double_math"``  the same, the graph built with the math attention kernel and     ~1 grad
                   without cuDNN (fused kernels without a double backward)
``"first_order"``  ``(grad f(theta + h v) - grad f(theta - h v)) / 2h``              2 grads
``"auto"``         ``"double"``; on torch's "not implemented" double-backward       as chosen
                   error, ``"double_math"``, then ``"first_order"`` (warned once)
=================  ==============================================================  =========

The first-order mode keeps no graph (half the memory of a retained double-backward graph)
and works with every kernel, on smooth losses: each difference is checked against its
one-sided halves (:func:`central_difference`; one more gradient, at the point, per operator
or trajectory step), a kink inside the step (ReLU, max-pool, ``abs``) is stepped around by
halving the step, and one that stays raises :class:`NonSmoothLossError`. Each of its
gradient evaluations replays the random-number state captured when the operator was built
(CPU and the parameters' accelerator), so dropout draws the same masks in every product as
in the graph the other modes retain.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import _tree
from . import recompute

__all__ = [
    "KINK_RETRIES",
    "KINK_TOLERANCE",
    "MODES",
    "NonSmoothLossError",
    "RngState",
    "autocast_dtype",
    "central_difference",
    "delayed_error_in",
    "first_order_step",
    "is_double_backward_error",
    "math_kernels",
]

MODES = ("auto", "double", "double_math", "first_order")

#: A central difference ``(g_+ - g_-) / 2h`` is refused when its one-sided halves disagree by
#: more than this fraction of it: ``||g_+ + g_- - 2 g_0|| > KINK_TOLERANCE ||g_+ - g_-||``.
#: On a smooth loss the left side is ``O(h)`` times the right (measured on tanh, GELU and SiLU
#: MLPs: at most 1.1e-3 in float32, 4e-7 in float64); a kink inside the step makes them equal
#: (ratio ~1), and the product is then wrong by about the jump over ``2h``.
KINK_TOLERANCE = 0.05


class NonSmoothLossError(RuntimeError):
    """First-order (finite-difference) products met a kink of the loss, so they are not the
    Hessian's.

    Central differences of gradients assume ``grad f`` is smooth within the step. A ReLU,
    max-pool, ``abs`` or ``clamp`` whose switch point lies inside it adds a jump divided by
    the step: measured 30x-3,000x off on a ReLU MLP of 256 rows (float32, float64), where
    autograd's products treat each switch as fixed. Raised when the one-sided differences
    disagree by more than :data:`KINK_TOLERANCE` at every step tried
    (:func:`central_difference`), before the product is used.

    Attributes:
        mismatch: ``||g(theta + h v) + g(theta - h v) - 2 g(theta)|| / ||g(theta + h v) -
            g(theta - h v)||`` (about 1 at a kink; ~1e-3 in float32 and ~1e-7 in float64 on
            smooth losses).
    """

    def __init__(self, message: str, mismatch: float):
        super().__init__(message)
        self.mismatch = mismatch


def _norm(xs: list[Tensor]) -> Tensor:
    """The Euclidean norm of several tensors together, in ``_tree.wide_dtype`` (0-d)."""
    wide = _tree.wide_dtype(xs[0].device)
    parts = [torch.linalg.vector_norm(x, dtype=wide) for x in xs]
    return torch.linalg.vector_norm(torch.stack(parts))


def central_difference(
    evaluate: Callable[[float], tuple[Sequence[Tensor | None], Sequence[Tensor | None]]],
    center: Sequence[Tensor | None],
    h: float,
    what: str,
    scale: Callable[[bool], float] | None = None,
) -> list[Tensor | None]:
    """``(g(theta + h v) - g(theta - h v)) / 2h`` per leaf, checked for kinks.

    ``evaluate(h)`` returns the gradients ``(g(theta + h v), g(theta - h v))`` (leaves,
    None where a leaf has none); ``center`` is ``g(theta)``, with the same random numbers
    (dropout masks). The one-sided differences must agree with the central one:
    ``||g_+ + g_- - 2 g_0|| <= KINK_TOLERANCE ||g_+ - g_-||`` (plus a rounding allowance).
    On a smooth loss that ratio is ``O(h)``; a kink inside the step makes it about
    ``e / (1 + e)`` for a product ``e`` off. A step that fails is halved (at most
    :data:`KINK_RETRIES` times) and the halved difference is accepted when the ratio passes
    or when it agrees with the previous difference to :data:`KINK_TOLERANCE` (a smooth loss
    whose one-sided differences part by more than that: the central ones differ by
    ``O(h^2)``); a kink that stays inside the step changes the central difference with the
    step, and :class:`NonSmoothLossError` naming ``what`` is raised. The last step is
    accepted too when the vector ``g_+ + g_- - 2 g_0`` became a quarter of itself (to
    :data:`QUARTER`) at each of two halvings: that term is ``h^2`` times the third
    derivative on a smooth loss, and the jump (or the sum of the jumps crossed, each its
    own vector) across kinks; it is what
    fails the ratio where the first derivative along ``v`` vanishes (forward mode's tangents
    ``H Z + H_tp`` at a converged run, by the implicit function theorem).

    ``scale(probe)``, when given, is the size ``||H|| ||v||`` a product along ``v`` has at
    the operator's scale: as the products so far tell (``probe=False``, asked on the first
    failed check), or learnt with products of its own if need be (``probe=True``, asked
    once before refusing). Both tests then measure the differences against
    ``max(||g_+ - g_-||, 2 h scale)`` (the agreement: ``max(||H v||, scale)``) rather than
    ``||g_+ - g_-||`` alone. Along a direction of the Hessian's (near) null space (an
    over-parameterized model, a parameter the loss ignores, an adjoint whose other part has
    decayed) ``H v`` is about 0 and the one-sided differences are rounding of the gradient,
    which is no kink; a kink's jump is still refused when it exceeds :data:`KINK_TOLERANCE` of the
    operator's scale (the product off by more than that fraction of ``||H|| ||v||``).
    Cost: two gradients per attempt, three norms and one synchronization.
    """
    previous: list[Tensor | None] | None = None
    bent, quartered, size = None, 0, None
    for attempt in range(KINK_RETRIES + 1):
        with recompute.watch() as seen:  # at theta +- h v: checkpointing would recompute
            plus, minus = evaluate(h)  # with the module's own weights (operators.recompute)
        recompute.refuse(seen.found, f"{what} (first-order products: gradients at theta +- h v)")
        out, read, curve = _checked(plus, minus, center, h)
        if size is None and scale is not None and _ratio(read, 0.0) > KINK_TOLERANCE:
            size = scale(False)  # ||H|| ||v|| as the products so far tell (asked once)
        ratio, passed = _passes(read, h, size, previous, out)
        if passed:
            return out
        quartered = quartered + 1 if bent is not None and _quartered(bent, curve) else 0
        if quartered >= 2:  # the curvature term fell as h^2 at each halving: smooth
            return out
        if attempt < KINK_RETRIES:
            previous, h, bent = out, 0.5 * h, curve
    if scale is not None:  # before refusing: the operator's scale, probed if not known yet
        ratio, passed = _passes(read, h, max(size or 0.0, scale(True)), previous, out)
        if passed:
            return out
    raise NonSmoothLossError(
        f"First-order products of {what} are not its Hessian's: the loss has a kink within "
        f"the finite-difference step (the one-sided differences disagree by {ratio:.3g} "
        f"of the central one at {KINK_RETRIES + 1} steps down to {h:.3g}; smooth losses "
        f"stay below {KINK_TOLERANCE:g}). A ReLU, max-pool, abs or clamp switches inside "
        "the step, and a central difference divides that jump by the step (as it divides "
        "the rounding of gradients computed in half precision: torch.autocast to bfloat16 "
        "or float16, half-precision parameters). Use products "
        "through autograd (hvp='double' or 'double_math': make the model twice "
        "differentiable, e.g. replace a custom once-differentiable function), or smooth "
        "activations (GELU, SiLU, Softplus) with hvp='first_order'.",
        ratio,
    )


def _passes(
    read: tuple[float, float, float],
    h: float,
    size: float | None,
    previous: list[Tensor | None] | None,
    out: list[Tensor | None],
) -> tuple[float, bool]:
    """The kink ratio of a step against the operator's scale ``size`` (``||H|| ||v||``;
    None: unknown), and whether the step passes: by that ratio, or by agreeing with the
    previous step's central difference."""
    size = size or 0.0
    ratio = _ratio(read, 2.0 * h * size)
    return ratio, ratio <= KINK_TOLERANCE or _agree(previous, out, size)


def _agree(a: Sequence[Tensor | None] | None, b: Sequence[Tensor | None], scale: float) -> bool:
    """Whether two central differences agree to ``KINK_TOLERANCE`` of the larger of their
    norm and ``scale`` (together; False without ``a``)."""
    if a is None:
        return False
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return True
    gap, size = torch.stack(
        [_norm([x - y for x, y in pairs]), _norm([y for _, y in pairs])]
    ).tolist()
    return gap <= KINK_TOLERANCE * max(size, scale)


#: Halvings of a finite-difference step that failed the kink check before raising.
KINK_RETRIES = 2
#: ``||4 c' - c|| <= QUARTER ||c||`` for the vectors ``c = g_+ + g_- - 2 g_0`` of a step and
#: ``c'`` of its half: the ``h^2`` of a smooth loss (a kink keeps the jump, ``c' ~ c``; the
#: switch points of a ReLU network crossed in proportion to the step leave a subset of the
#: jumps, another vector).
QUARTER = 0.1


def _quartered(before: list[Tensor], after: list[Tensor]) -> bool:
    """Whether the curvature vector ``after`` (half the step) is a quarter of ``before``."""
    if len(before) != len(after) or not before:
        return False
    gap, size = torch.stack(
        [_norm([4 * b - a for a, b in zip(before, after)]), _norm(before)]
    ).tolist()
    return 0 < size and gap <= QUARTER * size


def _ratio(read: tuple[float, float, float], reference: float) -> float:
    """``||g_+ + g_- - 2 g_0|| / max(||g_+ - g_-||, reference)``, 0 below the rounding
    level of ``g_0`` (``read``: the three norms of :func:`_checked`)."""
    curve, diff, floor = read
    if curve <= floor:
        return 0.0
    size = max(diff, reference)
    return curve / size if size > 0 else math.inf


def _checked(
    plus: Sequence[Tensor | None],
    minus: Sequence[Tensor | None],
    center: Sequence[Tensor | None],
    h: float,
) -> tuple[list[Tensor | None], tuple[float, float, float], list[Tensor]]:
    """The central differences, the norms ``||g_+ + g_- - 2 g_0||``, ``||g_+ - g_-||`` and
    the rounding level of ``g_0`` (:func:`_ratio`), and the vectors ``g_+ + g_- - 2 g_0``."""
    diff: list[Tensor] = []
    curve: list[Tensor] = []
    base: list[Tensor] = []
    out: list[Tensor | None] = []
    for a, b, c in zip(plus, minus, center):
        if a is None or b is None:
            out.append(None)
            continue
        d = a - b
        diff.append(d)
        curve.append(a + b if c is None else a + b - 2 * c)
        if c is not None:
            base.append(c)
        out.append(d / (2.0 * h))
    if not diff:
        return out, (0.0, 0.0, 0.0), curve
    eps = max(torch.finfo(d.dtype).eps for d in diff)
    norms = [_norm(curve), _norm(diff)] + ([_norm(base)] if base else [])
    read = torch.stack(norms).tolist()
    return out, (read[0], read[1], 64 * eps * (read[2] if base else 0.0)), curve


_DOUBLE_BACKWARD = re.compile(
    r"derivative for .+ is not implemented|double backwards? (is )?(not|un)|"
    r"differentiate twice|once_differentiable|"
    # a torch.compile'd model: AOTAutograd's backward takes no create_graph/retain_graph
    r"donated buffers which requires create_graph=False|not currently support double backward",
    re.IGNORECASE,
)


def is_double_backward_error(error: BaseException) -> bool:
    """Whether ``error`` is torch's refusal to differentiate a backward formula.

    Matches ``"derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
    not implemented"``, ``"Double backwards is not supported for CuDNN RNNs"``, ``"... Double
    backward is unsupported ..."``, the ``@once_differentiable`` error of custom functions
    and the two refusals of a ``torch.compile``'d model's backward (donated buffers, or
    "does not currently support double backward").
    """
    return isinstance(error, RuntimeError) and bool(_DOUBLE_BACKWARD.search(str(error)))


@contextlib.contextmanager
def math_kernels() -> Iterator[None]:
    """Run the enclosed forward pass with kernels that have a double backward.

    Scaled dot-product attention uses its math backend (``sdpa_kernel(SDPBackend.MATH)``:
    matmuls and a softmax instead of the fused flash / memory-efficient kernels) and cuDNN
    is off (cuDNN RNNs have no double backward; convolutions fall back to native kernels).
    """
    cudnn = torch.backends.cudnn
    with (
        sdpa_kernel(SDPBackend.MATH),
        cudnn.flags(
            enabled=False,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=cudnn.allow_tf32,
        ),
    ):
        yield


def first_order_step(theta_norm: float, v_norm: float, size: int, dtype: torch.dtype) -> float:
    """The step ``h`` of the central difference ``(g(theta + h v) - g(theta - h v)) / 2h``.

    ``h = eps^(1/3) (1 + ||theta|| / sqrt(n)) / (2 ||v||)``: the perturbation ``h v`` has
    norm ``eps^(1/3) (1 + rms(theta)) / 2``. The power ``1/3`` balances the truncation
    error (``h^2 ||v||^3`` times the third derivative) against the rounding error
    (``eps ||grad f|| / (h ||v||)``) of the difference, both ``O(eps^(2/3))`` relative. The
    root-mean-square of ``theta``, rather than its norm (which grows like ``sqrt(n)``),
    keeps the step of a large network as small as that of a small one with weights of the
    same size; the factor ``1/2`` was the best of 0.3, 0.5, 1 over a tanh MLP and two
    transformer layers (worst relative error 2.5e-4 in float32, 3e-10 in float64). ``eps`` is
    the machine epsilon of the least precise parameter dtype, ``n`` the number of
    parameters.
    """
    eps = torch.finfo(dtype).eps
    rms = theta_norm / max(size, 1) ** 0.5
    return 0.5 * eps ** (1.0 / 3.0) * (1.0 + rms) / v_norm


def delayed_error_in(outputs: list[torch.Tensor]) -> bool:
    """Whether the graph of ``outputs`` holds a node that refuses differentiation.

    A custom ``autograd.Function`` whose backward is ``@once_differentiable`` leaves an
    ``Error`` node in the graph of the gradient. Torch raises only if a backward pass
    reaches that node; a Hessian-vector product with respect to the parameters usually does
    not, and silently misses that function's part of the Hessian. The walk visits each node
    once (at most ``200_000``).
    """
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen = set(stack)  # the nodes themselves (kept alive: an id could be reused)
    safe, names = _SAFE, _ERROR_NAMES
    add, push, pop = seen.add, stack.append, stack.pop
    while stack and len(seen) < 200_000:
        node = pop()
        kind = type(node)
        if kind not in safe:  # a node class not known to be safe: ask its name
            if node.name() in names:
                return True
            safe.add(kind)
        for fn, _ in node.next_functions:
            if fn is not None and fn not in seen:
                add(fn)
                push(fn)
    return False


_ERROR_NAMES = ("torch::autograd::Error", "torch::autograd::DelayedError")
#: The autograd node classes known not to be error nodes: a node's ``name()`` is fixed by its
#: class (a C++ node type, or a custom Function's backward class), so each class is asked once.
_SAFE: set[type] = set()


class RngState:
    """The random-number state of the CPU and of ``device``'s accelerator, to replay.

    ``with state.replay(): ...`` runs the block from the captured state inside
    ``torch.random.fork_rng``, so the global streams are left as they were afterwards.
    """

    def __init__(self, device: torch.device):
        self.device = device if type(device) is torch.device else torch.device(device)
        # a copy of the CPU generator (cheaper than its state as a tensor, which only a
        # replay needs: most operators are never rebuilt)
        self._cpu_generator = torch.default_generator.clone_state()
        self._cpu: torch.Tensor | None = None
        self.accelerator: torch.Tensor | None = None
        if self.device.type == "cuda":
            self.accelerator = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            self.accelerator = torch.mps.get_rng_state()

    @property
    def cpu(self) -> torch.Tensor:
        """The captured CPU random-number state (as ``torch.get_rng_state()`` returns it)."""
        if self._cpu is None:
            self._cpu = self._cpu_generator.get_state()
        return self._cpu

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the captured state; restore the live state afterwards."""
        kind = self.device.type
        if kind == "cuda":
            index = self.device.index
            devices = [torch.cuda.current_device() if index is None else index]
        elif kind == "mps":
            devices = [0]
        else:
            devices, kind = [], "cuda"
        with torch.random.fork_rng(devices=devices, device_type=kind):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(self.accelerator, self.device)
            elif self.accelerator is not None:
                torch.mps.set_rng_state(self.accelerator)
            yield


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now (None when it is off): a graph
    built under autocast answers its products in that dtype."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
