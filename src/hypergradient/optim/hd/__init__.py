"""Online learning-rate adaptation by hypergradient descent (SGD-HD, SGDN-HD, Adam-HD).

Baydin, Cornish, Martinez Rubio, Schmidt & Wood (2018), "Online Learning Rate Adaptation
with Hypergradient Descent", ICLR. https://arxiv.org/abs/1703.04782

Every base optimizer here moves the parameters by ``theta_t = theta_{t-1} - alpha_t u_t``
where ``u_t`` is its update direction (the gradient for SGD, the momentum/Nesterov
direction with momentum, ``m_hat / (sqrt(v_hat) + eps)`` for Adam). Since
``d theta_{t-1} / d alpha = -u_{t-1}`` for the step that produced ``theta_{t-1}``, the
derivative of the objective with respect to the learning rate used at that step is

    h_t = d f(theta_{t-1}) / d alpha_{t-1} = -grad f(theta_{t-1}) . u_{t-1},

available for one dot product once the new gradient is known. Before taking step ``t``
the learning rate descends it, ``alpha_t = alpha_{t-1} - beta h_t``: it grows while
successive directions agree (``g_t . u_{t-1} > 0``) and shrinks when they disagree (an
overshoot). The learning rate is one Python float per parameter group, kept in
``group["lr"]`` like every ``torch.optim`` optimizer, so schedulers and loggers see it.

Non-finite values behave as in ``torch.optim``: ``step()`` never raises because of the
data. A non-finite hypergradient (a NaN or Inf gradient, or a dot product that overflows)
is not applied: the group keeps its previous learning rate for that step and a
:class:`~hypergradient.HypergradientWarning` says so, so one bad batch cannot leave ``lr``
NaN for the rest of training. The parameter update itself is ``torch.optim``'s (a NaN
gradient reaches the parameters, as with ``torch.optim.SGD``; ``torch.amp.GradScaler``
skips such steps before they reach the optimizer).

Every hyperparameter is validated through :mod:`hypergradient._vocab` when the optimizer
or a parameter group is created, and when a ``state_dict`` is loaded (there ``lr`` may have
any sign): numbers (numpy scalars and 0-d tensors included) must be finite and in range,
``bool`` is refused where a number is meant
(:class:`~hypergradient._vocab.ArgumentTypeError`), and flags (``nesterov``, ``maximize``)
must be ``bool``.
"""

from .adam import AdamHD
from .sgd import SGDHD

__all__ = ["SGDHD", "AdamHD"]
