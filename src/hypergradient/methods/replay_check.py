"""Whether a trajectory method's replay of the window ended where the run did.

The hyper-optimizer hands a trajectory method the model's parameters after the window; the
method's differentiable replay of the steps must end there, to rounding, or it
differentiated another run (a loss other than ``train_loss``, other batches, clipping): the
relative distance is ``info.replay_error`` and above ``1e-4`` (four units of the
parameters' rounding in half precision) it warns.

One kind of distance is no such sign: along a parameter the training loss does not depend
on. A convolution's bias followed by BatchNorm has a gradient of exactly 0 in exact
arithmetic; in float32 it is rounding noise (norm 1.3e-6 on a digits CNN), which Adam
divides by its own size into steps as large as the learning rate, and the run's and the
replay's noise differ (their kernels round differently): the bias drifts 2.8e-3 apart while
every other parameter stays within 1e-8, a replay error of 1.3e-4 to 3.5e-4, and the warning
fired at three hyper-steps of four of a correct loop, blaming ``train_loss``. The
hypergradient does not see that drift (float32 against float64: 2.3e-6).

So, above the bound, :func:`replay_error` finds the fewest leaves whose distance carries the
excess (at most :data:`MAX_LEAVES`) and moves each, alone, from the model's value to the
replay's: where ``train_loss``'s gradient (on the window's last batch, with its random
draws) does not change beyond rounding (:data:`GRADIENT_ROUNDING` units), the loss does not
see that leaf's drift (no derivative of it along the drift), and the rest of the distance
decides. Cost: none within the bound; above it, one gradient per leaf tested, plus one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._vocab import HypergradientWarning

__all__ = ["GRADIENT_ROUNDING", "MAX_LEAVES", "replay_error"]

#: Leaves tested as drifting along directions the loss does not see.
MAX_LEAVES = 4
#: Units of the parameters' rounding a gradient may move by and count as unchanged.
GRADIENT_ROUNDING = 100.0


def replay_error(
    run: Any, replayed: Sequence[Tensor], real: Any, steps: int, rounding: float = 0.0
) -> tuple[float, dict[str, Any]]:
    """The relative distance of the replay's final parameters to the real ones (a warning
    above the bound, unless the loss does not see the excess) and the stats of the leaves
    whose drift it does not see (``replay_error_unseen``: their paths;
    ``replay_error_seen``: the distance without them). ``rounding``: the unit roundoff of
    steps trained in a precision the replay does not use (float16 autocast), of which four
    units are allowed too."""
    leaves = [b.detach() for b in _tree.flatten(real, "final_params")[0]]
    parts = [float((a - b).double().pow(2).sum()) for a, b in zip(replayed, leaves)]
    den = max(sum(float(b.double().pow(2).sum()) for b in leaves), 1e-300)
    error = math.sqrt(sum(parts) / den)
    # Rounding alone separates the eager and the functional step by a few units in the last
    # place of the parameters' dtype (half precision: ~1e-3).
    tol = max([1e-4, 4 * rounding] + [4 * torch.finfo(b.dtype).eps for b in leaves])
    if not error > tol:
        return error, {}
    unseen = _unseen(run, replayed, leaves, parts, den, tol) if math.isfinite(error) else None
    if unseen is not None:
        return error, {"replay_error_unseen": unseen[0], "replay_error_seen": unseen[1]}
    warnings.warn(
        f"The differentiable replay of the last {steps} steps ended {error:.2e} (relative) "
        "away from the model's parameters: train_loss must be the loss the model was "
        "trained on, on the same batches, with a deterministic inner optimizer (random "
        "ops inside the loss are replayed from the recorded random-number states). "
        "Under torch.autocast, rounding differences of about 1e-3 are expected.",
        HypergradientWarning,
        stacklevel=4,
    )
    return error, {}


def _unseen(
    run: Any,
    replayed: Sequence[Tensor],
    leaves: list[Tensor],
    parts: list[float],
    den: float,
    tol: float,
) -> tuple[list[str], float] | None:
    """The paths of the fewest leaves whose drift carries the distance above ``tol``, and
    the distance without them, when ``train_loss``'s gradient does not see any of their
    drifts; else None (too many leaves, a process group, a gradient that moves)."""
    rest, chosen = sum(parts), []
    for i in sorted(range(len(parts)), key=lambda i: -parts[i]):
        if math.sqrt(max(rest, 0.0) / den) <= tol:
            break
        chosen.append(i)
        rest -= parts[i]
    if not chosen or len(chosen) > MAX_LEAVES or getattr(run, "group", None) is not None:
        return None
    t = run.steps - 1
    base = _gradient(run, leaves, t)
    scale = math.sqrt(sum(float(g.double().pow(2).sum()) for g in base))
    eps = max(torch.finfo(b.dtype).eps for b in leaves)
    if not 0.0 < scale < math.inf:
        return None
    for i in chosen:
        moved = list(leaves)
        moved[i] = replayed[i].detach().to(leaves[i].dtype)
        diff = sum(
            float((a - b).double().pow(2).sum()) for a, b in zip(_gradient(run, moved, t), base)
        )
        if not math.sqrt(diff) <= GRADIENT_ROUNDING * eps * scale:
            return None
    return [run.pspec.paths[i] for i in chosen], math.sqrt(max(rest, 0.0) / den)


def _gradient(run: Any, leaves: list[Tensor], t: int) -> list[Tensor]:
    """``train_loss``'s gradient at ``leaves`` on step ``t``'s batch, with its draws."""
    with run.again(t):
        return run.local_grad(leaves, t)[0]
