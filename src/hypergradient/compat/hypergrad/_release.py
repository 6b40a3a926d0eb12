"""The names of hypergrad 0.0.1 *as released on PyPI*, on the solver of its repository.

``pip install hypergrad==0.0.1`` installs an earlier state of hypergrad's code than its
repository's head (both say 0.0.1). The release's ``BaseSolver`` names the functional model
``f_model``/``f_params``/``f_optim_state``, takes ``functorch_requires_grad``, has
``global_step``, lets a subclass define the objectives as ``inner_obj``/``outer_obj``
(returning ``(loss, output)``; :class:`~.solver.BaseSolver` has both names) and sets the
hypergradient with ``set_out_grad``; its ``utils`` has ``vector_to_tree``. The head renamed
them (``inner_func``, ``inner_params``, ``inner_optim_state``, ``inner_requires_grad``,
``inner_forward``, ``outer_forward``, the ``outer_grad`` setter, ``vector_to_params``). Code
written for either runs here: :class:`ReleaseNames` gives :class:`~.solver.BaseSolver` the
release's names as aliases of the head's (reading or assigning one reads or assigns the
other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .utils import Params

__all__ = ["ReleaseNames", "default_hook", "overridden", "released_device"]

_F = TypeVar("_F", bound=Callable[..., Any])


def released_device(flag: Any, device: Any) -> tuple[Any, Any]:
    """``(flag, device)`` with the release's positional ``device`` moved to its place.

    The release's constructors end ``..., functorch_requires_grad, device``; the head's put
    a flag where the release has ``device`` (``outer_requires_grad`` in ``BaseSolver``,
    ``skip_sync_inner`` in ``BaseImplicitSolver``). A device given there by position (a
    ``torch.device`` or a string such as ``"cpu"``, never a flag) is the release's
    ``device``; the flag keeps its default, False.
    """
    if isinstance(flag, (torch.device, str)) and device is None:
        return False, flag
    return flag, device


def default_hook(fn: _F) -> _F:
    """Mark ``fn`` as a base class's delegating default (see :func:`overridden`)."""
    fn.__dict__["compat_default"] = True
    return fn


def overridden(obj: object, name: str) -> bool:
    """Whether ``type(obj)`` defines the hook ``name`` itself (not a delegating default)."""
    return not getattr(getattr(type(obj), name), "compat_default", False)


class ReleaseNames:
    """hypergrad 0.0.1's released attribute and hook names, aliasing the head's ones."""

    inner_func: Callable[..., Any] | None
    inner_params: Params | None
    inner_optim_state: Any
    _inner_requires_grad: bool
    _global_step: int

    @property
    def f_model(self) -> Callable[..., Any] | None:
        """The released name of ``inner_func`` (the functional inner model)."""
        return self.inner_func

    @f_model.setter
    def f_model(self, value: Callable[..., Any] | None) -> None:
        self.inner_func = value

    @property
    def f_params(self) -> Params | None:
        """The released name of ``inner_params`` (the functional inner parameters)."""
        return self.inner_params

    @f_params.setter
    def f_params(self, value: Params | None) -> None:
        self.inner_params = value

    @property
    def f_optim_state(self) -> Any:
        """The released name of ``inner_optim_state``."""
        return self.inner_optim_state

    @f_optim_state.setter
    def f_optim_state(self, value: Any) -> None:
        self.inner_optim_state = value

    @property
    def _functorch_requires_grad(self) -> bool:
        # read by the release's dataset-distillation example's reset_inner_model
        return self._inner_requires_grad

    @property
    def global_step(self) -> int:
        """Iterations of ``run()`` completed (the release's counter)."""
        return self._global_step

    def check_objectives(self) -> None:
        """A concrete solver defines each objective, under the head's or the release's name."""
        for head, release in (("inner_forward", "inner_obj"), ("outer_forward", "outer_obj")):
            if not (overridden(self, head) or overridden(self, release)):
                raise TypeError(
                    f"Can't instantiate {type(self).__name__}: it defines neither `{head}` nor "
                    f"`{release}` (hypergrad 0.0.1's released name); define one of them."
                )
