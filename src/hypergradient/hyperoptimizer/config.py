"""The hyper-optimizer's configuration, and its consistency across data-parallel ranks.

In data-parallel use every rank runs its own hyper-optimizer; they must agree on
everything that decides when and how collectives run (``inner_steps``, the method and its
settings, the inner optimizer's type and settings, batch sizes), or one rank waits in a
collective the others never reach. :func:`check_ranks` compares a fingerprint of the
configuration (and of the hyperparameters) across the ranks and raises on every rank
when they differ.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from .. import distributed
from .._vocab import HypergradientWarning, as_choice

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = ["check_group", "check_nonfinite", "check_ranks", "configuration", "write_checked"]


def check_group(group: Any) -> None:
    """Raise ``ValueError`` unless ``group`` is None or usable by this process."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "`process_group` was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first (e.g. under torchrun)."
        )
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"This process (global rank {dist.get_rank()}) is not a member of "
            "`process_group`; pass a group that contains every rank."
        )


def check_nonfinite(nonfinite: str | None, group: Any) -> str:
    """``nonfinite``, checked (None: ``"skip"`` with a process group, else ``"raise"``)."""
    default = "skip" if group is not None else "raise"
    return as_choice(default if nonfinite is None else nonfinite, "nonfinite", ("raise", "skip"))


def configuration(hopt: HyperOptimizer) -> dict[str, Any]:
    """What every rank must agree on: ``inner_steps``, the step count, the inner
    optimizer's type and settings, the outer optimizer's type, settings and state (a
    per-rank outer learning rate would step the ranks' hyperparameters apart), the method's
    type and configuration, ``nonfinite``, ``on_divergence`` (a diverging run is skipped
    on some ranks and applied on others otherwise), the holdout guard's settings."""
    groups = hopt.inner_optimizer.param_groups
    outer = hopt.outer_optimizer.state_dict()
    return {
        "inner_steps": hopt.inner_steps,
        "step": hopt.loop.count,
        "inner_optimizer": type(hopt.inner_optimizer).__name__,
        "settings": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "method": type(hopt.method).__name__,
        "method_config": hopt.method.config(),
        "outer_optimizer": type(hopt.outer_optimizer).__name__,
        "outer_settings": [
            {k: v for k, v in g.items() if k != "params"} for g in outer["param_groups"]
        ],
        "outer_state": outer["state"],
        "nonfinite": hopt.nonfinite,
        "on_divergence": hopt.on_divergence,
        "holdout": None if hopt.guard is None else hopt.guard.config(),
    }


def check_ranks(hopt: HyperOptimizer, decisions: Any = None) -> None:
    """Raise ``ValueError`` on every rank if the hyperparameters or the
    :func:`configuration` differ between the ranks of ``hopt.process_group`` (nothing
    without a group). One collective (an all-reduce of a few numbers). ``decisions``:
    plain data every rank must also agree on (the hyper-step's local skip decisions);
    without them (at construction) the method's state is compared too."""
    group = hopt.process_group
    if group is None:
        return
    hparams, config = hopt.raw_hparams(), configuration(hopt)
    if decisions is not None:
        config["decisions"] = decisions
    else:  # at construction: a solver seeded from each rank's own global random stream is
        # refused here, before training (the method compares its state at every call)
        config["method_state"] = hopt.method.state_dict()
    distributed.check_consistent(hparams, group, "the hyperparameters", config=config)


def write_checked(hopt: HyperOptimizer) -> None:
    """Write the linked optimizer settings, then :func:`check_ranks` (the ranks compare the
    settings as written); if the check raises, the inner optimizer's param groups are put
    back as they were (the same objects), so a refused construction changes nothing."""
    optimizer = hopt.inner_optimizer
    before = [dict(g) for g in optimizer.param_groups]
    hopt.hyperparameters.write_settings(optimizer)
    for setting, name in hopt.hyperparameters.links.items():
        own = [g.get(setting) for g in before]
        if any(v != own[0] for v in own):
            warnings.warn(
                f"optimizer_hparams links {setting!r} to the hyperparameter {name!r}: every "
                f"param group now steps with its value, {optimizer.param_groups[0][setting]!r}; "
                f"the groups' own values {own} are replaced (a linked setting is one value "
                "for every group; link another setting, or keep the groups' and tune others).",
                HypergradientWarning,
                stacklevel=4,
            )
    try:
        check_ranks(hopt)
    except BaseException:
        for group, settings in zip(optimizer.param_groups, before):
            group.clear()
            group.update(settings)
        raise
