"""``train_loss``'s gradient read off the step's own backward pass, for T1T2's check.

The step-gradient check (:mod:`.step_grads`) compares the step's ``.grad`` with
``train_loss``'s gradient at the step's start, which a replay takes by a forward and a
backward pass. When the step's loss came from ``hopt.train_loss(batch)`` (one call with a
graph, in a step that ends with a T1T2 hyper-step), :class:`Tap` watches that forward
pass's own graph instead: hooks on its autograd nodes (those created by the call) collect
what its backward pass sends into each trained parameter, and the factor ``c`` that
reached the loss (``(c * loss).backward()``). That is ``c`` times the loss's gradient when
nothing else flowed through the graph: each node's incoming gradient is checked to be the
sum of what its consumers in the graph sent (an activation regularizer built on a tensor
of the graph outside ``train_loss`` adds to it), every node ran exactly once, and the
root received one gradient.

:func:`gradient` then stands for the replay's backward pass when the replay is that
forward pass: the step's batch is the call's (the same tensors), the replay's graph has the
same nodes and edges with the trained parameters where the call had them (a parameter used
from outside the reparametrized module, or through a tensor computed before the call, is
not replayed as trained: the graphs differ), and the replayed loss is bitwise the call's.
Anything else, or a comparison the check would not accept, falls back to the replay's
backward pass (:func:`.step_grads.compare`), so the check decides as before.

Cost, on a step that ends with a T1T2 hyper-step only: a walk of the call's graph and one
hook per node (a Python call per node in the backward pass, about 0.1-0.2 ms for a 3-layer
MLP), and the gradients the pass sent into the parameters, kept to the step's end
(AccumulateGrad then copies them into ``.grad``: one more parameter-sized buffer).
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..methods import T1T2
from .precision import loss_scale
from .step_checks import ends_window

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = ["Tap", "call", "forget", "gradient", "sequence", "start", "tap"]

#: Graphs of more nodes are not tapped (the walk and its hooks would cost more than they save).
MAX_NODES = 20000

_ONE = torch.zeros((), requires_grad=True)
with torch.enable_grad():
    _ACCUMULATE = type((_ONE * 1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]
_TAPS: weakref.WeakKeyDictionary[Any, Tap | None] = weakref.WeakKeyDictionary()


def sequence() -> int:
    """The sequence number the next autograd node created in this thread gets, minus one
    (each node takes the next; the counter is per thread)."""
    if torch.is_grad_enabled():
        return (_ONE * 1).grad_fn._sequence_nr()  # type: ignore[union-attr]
    with torch.enable_grad():
        return (_ONE * 1).grad_fn._sequence_nr()  # type: ignore[union-attr]


def call(hopt: HyperOptimizer, batch: Any) -> Any:
    """``hopt.train_loss``'s forward pass: the user's ``train_loss`` on the loop's model
    with the current hyperparameters, tapped (:func:`tap`) in a step that may be."""
    begin = start(hopt)
    loss = hopt.train_loss_fn(hopt.view.loop_model(), hopt.hparams, batch)
    tap(hopt, begin, loss, batch)
    return loss


def start(hopt: HyperOptimizer) -> int | None:
    """Before ``hopt.train_loss``'s forward pass: the sequence number it starts after, when
    the step may be tapped (a T1T2 step ending with a hyper-step, no process group); else
    None."""
    if hopt.process_group is not None or not isinstance(hopt.method, T1T2):
        return None
    if not torch.is_grad_enabled():
        return None  # (a logging call: no graph)
    return sequence() if ends_window(hopt) else None


def tap(hopt: HyperOptimizer, begin: int | None, loss: Any, batch: Any) -> None:
    """After ``hopt.train_loss``'s forward pass from ``begin`` (:func:`start`): tap its
    graph; a second call with a graph in the step spoils the step's tap (the step's
    gradient is then not one forward pass's)."""
    if begin is None or not (isinstance(loss, Tensor) and loss.requires_grad):
        return
    if hopt in _TAPS:
        _TAPS[hopt] = None  # several calls: the replay decides
        return
    try:
        _TAPS[hopt] = Tap(loss, batch, begin, sequence(), hopt.view.params)
    except Exception:  # (a graph it cannot read: the replay decides)
        _TAPS[hopt] = None


def forget(hopt: HyperOptimizer) -> None:
    """A step's end: drop its tap."""
    _TAPS.pop(hopt, None)


def gradient(
    hopt: HyperOptimizer, batch: Any, leaves: list[Tensor], loss: Any
) -> tuple[list[Tensor], float] | None:
    """``train_loss``'s gradient at the step's start, per trained parameter, from the step's
    tapped backward pass, and the factor that reached the loss (the gradient is what the
    pass sent divided by it), when the replay (``loss`` at the fresh ``leaves``, on
    ``batch``) is the tapped forward pass (see the module notes); else None. Read once: the
    tap is dropped (as a spoiled one, so a later call in the step answers None), and with it
    the gradients it kept, before the look-ahead allocates its own (on the MNIST-sized MLP
    two parameter-sized buffers the look-ahead's temporaries would otherwise add to the
    heap: fresh pages, ~390 page faults per hyper-step)."""
    found = _TAPS.get(hopt)
    if found is None:
        return None
    _TAPS[hopt] = None
    if not isinstance(loss, Tensor) or loss_scale(hopt.loop) != 1.0:
        return None
    return found.gradient(batch, leaves, loss)


class Tap:
    """Hooks on the nodes one forward pass created (sequence numbers in ``(begin, end)``)
    of ``loss``'s graph: what reaches ``loss``, what each node sends into each of
    ``params``, and whether any node received more than its consumers in the graph sent."""

    def __init__(self, loss: Tensor, batch: Any, begin: int, end: int, params: list[Tensor]):
        self.batch, self.value = batch, loss.detach()
        self.ok, self.root_calls, self.scale = True, 0, None
        index = {id(p): i for i, p in enumerate(params)}
        self.count = len(params)
        self.sent: list[list[Tensor]] = [[] for _ in params]
        root = loss.grad_fn
        self.nodes: list[Any] = []
        self.edges: list[list[tuple]] = []  # per node: per edge (kind, target, slot)
        self.pending: dict[tuple[int, int], list[Any]] = {}
        self.calls: list[int] = []
        self.unequal: list[Tensor] = []  # per sum of several consumers: whether it differs
        self.root_nr = getattr(loss, "output_nr", 0)
        found = None if root is None else _walk(root, begin, end)
        self.ok = found is not None
        self.nodes = found or []
        position = {id(node): i for i, node in enumerate(self.nodes)}
        for node in self.nodes:
            self.edges.append([_edge(nxt, k, index, position) for nxt, k in node.next_functions])
        self.calls = [0] * len(self.nodes)
        if self.ok:  # (the hooks hold the tap weakly: the nodes hold the hooks)
            me = weakref.ref(self)
            for i, node in enumerate(self.nodes):
                node.register_hook(functools.partial(_ran, me, i))

    def arrived(self, i: int, grad_outputs: tuple) -> None:
        """Node ``i``'s incoming gradients: the root's is the factor; any other's must be
        what its consumers in the graph sent."""
        self.calls[i] += 1
        for slot, g in enumerate(grad_outputs):
            sent = self.pending.pop((i, slot), [])
            if i == 0 and slot == self.root_nr:
                self.root_calls += 1
                self.scale = g  # the factor that reached the loss
            elif not self._sum_is(g, sent):
                self.ok = False  # a gradient from outside the graph, or a hole in it

    def _sum_is(self, g: Any, sent: list[Any]) -> bool:
        """Whether ``g``, a node's incoming gradient, is what its consumers in the graph
        sent: the same tensor for one; for several, their sum in the order sent (compared
        on the device, read with the rest by :meth:`gradient`: no synchronization here)."""
        sent = [s for s in sent if s is not None]
        if not sent:
            return g is None
        if len(sent) == 1:
            return g is sent[0]
        total = _total(sent)
        if not isinstance(g, Tensor) or g.shape != total.shape or g.dtype != total.dtype:
            return False
        self.unequal.append(torch.ne(g, total).any())
        return True

    def left(self, i: int, grad_inputs: tuple) -> None:
        """What node ``i`` sends: to a node of the graph (checked there), to a parameter."""
        for (kind, target, slot), g in zip(self.edges[i], grad_inputs):
            if kind == "node":
                self.pending.setdefault((target, slot), []).append(g)
            elif kind == "param" and g is not None:
                self.sent[target].append(g)

    def gradient(
        self, batch: Any, leaves: list[Tensor], loss: Tensor
    ) -> tuple[list[Tensor], float] | None:
        """The tapped gradient divided by the factor that reached the loss, per parameter
        (zeros where nothing was sent), when the replay is the tapped pass; else None."""
        factor = self._factor()
        if factor is None or not _same_batch(batch, self.batch):
            return None
        if loss.dtype != self.value.dtype or not torch.equal(loss.detach(), self.value):
            return None  # not bitwise the same evaluation
        if not self._same_graph(loss.grad_fn, leaves):
            return None
        out = []
        for p, sent in zip(leaves, self.sent):
            total = _total(sent) if sent else torch.zeros_like(p)
            total = total.to_dense() if total.is_sparse else total  # (an Embedding's)
            out.append(total if factor == 1.0 else total / factor)
        return out, factor

    def _factor(self) -> float | None:
        """The nonzero factor that reached the loss, when the backward pass ran through the
        graph once with nothing from outside it; else None."""
        c = self.scale
        ok = self.ok and self.root_calls == 1 and all(n == 1 for n in self.calls)
        if not ok or not isinstance(c, Tensor) or c.numel() != 1:
            return None
        if self.unequal and bool(torch.stack(self.unequal).any()):
            return None  # a gradient from outside the graph
        factor = float(c)
        return factor if factor != 0.0 else None

    def _same_graph(self, root: Any, leaves: list[Tensor]) -> bool:
        """Whether the replay's graph from ``root`` has the tapped graph's nodes and edges,
        with ``leaves`` where the call had the trained parameters (an edge the call did not
        have may only reach tensors other than ``leaves``: the hyperparameters, detached
        in the loop, are leaves of the replay)."""
        if root is None or len(leaves) != self.count:
            return False
        trained = {id(p): i for i, p in enumerate(leaves)}
        matched: dict[int, Any] = {0: root}
        stack = [0]
        seen = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            mine, theirs = self.nodes[i], matched[i]
            found = theirs.next_functions
            if type(mine) is not type(theirs) or len(found) != len(self.edges[i]):
                return False
            for (kind, target, slot), (nxt, nr) in zip(self.edges[i], found):
                if not _edge_matches(kind, target, slot, nxt, nr, trained):
                    return False
                if kind == "node":
                    if matched.setdefault(target, nxt) is not nxt:
                        return False
                    stack.append(target)
        return len(seen) == len(self.nodes)


def _ran(me: Any, i: int, grad_inputs: tuple, grad_outputs: tuple) -> None:
    """Node ``i``'s post-hook: what reached it (its consumers in the graph ran before it,
    their hooks too) and what it sends."""
    found = me()
    if found is not None:
        try:
            found.arrived(i, grad_outputs)
            found.left(i, grad_inputs)
        except Exception:  # (never the user's backward pass's error: the replay decides)
            found.ok = False


def _walk(root: Any, begin: int, end: int) -> list[Any] | None:
    """The nodes of ``root``'s graph created between the sequence numbers ``begin`` and
    ``end`` (the root first), reached through such nodes; None beyond :data:`MAX_NODES`."""
    nodes: list[Any] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        if len(nodes) > MAX_NODES:
            return None
        for nxt, _ in node.next_functions:
            if nxt is not None and not _is_leaf(nxt) and begin < _nr(nxt) < end:
                stack.append(nxt)
    return nodes


def _same_batch(a: Any, b: Any) -> bool:
    """Whether two batches hold the same objects (tuples, lists and dicts of the same
    tensors; plain values equal)."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind in (tuple, list):
        return len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b))
    if kind is dict:
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    return kind in (int, float, str, bool) and a == b


def _edge_matches(kind: str, target: Any, slot: int, nxt: Any, nr: int, trained: dict) -> bool:
    """Whether the replay's edge ``(nxt, nr)`` is the tapped edge ``(kind, target, slot)``."""
    if kind == "none":
        return nxt is None or not _reaches(nxt, trained)
    if nxt is None or nr != slot:
        return False
    if kind == "param":
        return _is_leaf(nxt) and trained.get(id(nxt.variable)) == target
    if kind == "node":
        return not _is_leaf(nxt)
    return nxt is target  # a tensor outside the call: the same leaf or node


def _reaches(node: Any, trained: dict) -> bool:
    """Whether ``node``'s graph reaches one of the ``trained`` leaves."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if _is_leaf(n):
            if id(n.variable) in trained:
                return True
            continue
        stack.extend(nxt for nxt, _ in n.next_functions)
    return False


def _edge(nxt: Any, slot: int, index: dict[int, int], position: dict[int, int]) -> tuple:
    """An edge of the tapped graph: to nothing, a trained parameter (its index), a node of
    the call (its position) or anything else (kept as it is)."""
    if nxt is None:
        return ("none", None, slot)
    if _is_leaf(nxt) and id(nxt.variable) in index:
        return ("param", index[id(nxt.variable)], slot)
    if id(nxt) in position:
        return ("node", position[id(nxt)], slot)
    return ("other", nxt, slot)


def _is_leaf(node: Any) -> bool:
    """Whether ``node`` accumulates into a leaf tensor (AccumulateGrad)."""
    return type(node) is _ACCUMULATE


def _nr(node: Any) -> int:
    """A node's sequence number (-1 without one: then not taken as the call's)."""
    nr = getattr(node, "_sequence_nr", None)
    return -1 if nr is None else int(nr())


def _total(sent: list[Tensor]) -> Tensor:
    total = sent[0]
    for s in sent[1:]:
        total = total + s
    return total
