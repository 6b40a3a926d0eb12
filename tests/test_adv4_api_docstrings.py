"""Every public name of the package root and of its public submodules has a docstring, and
so has every public method and property of a public class (inherited from a base class
that documents it is enough). Before, ``Status.ok``, ``Status.message``, ``Info.message``,
``DampedOperator.num_matvecs``, ``Trajectory.steps``, ``FunctionalOptimizer.init``,
``AutoDamping``'s checkpoint methods and the ``TaskBatch`` implementations had none.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "hypergradient",
    "hypergradient.solvers",
    "hypergradient.operators",
    "hypergradient.methods",
    "hypergradient.optim",
    "hypergradient.meta",
    "hypergradient.constraints",
]


def _public():
    seen: dict[int, tuple[str, object]] = {}
    for m in MODULES:
        mod = importlib.import_module(m)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not inspect.ismodule(obj) and (callable(obj) or inspect.isclass(obj)):
                seen.setdefault(id(obj), (f"{m}.{name}", obj))
    return sorted(seen.values(), key=lambda x: x[0])


def _documented(cls: type, attr: str) -> bool:
    """Some class of ``cls``'s MRO that defines ``attr`` documents it."""
    for klass in cls.__mro__:
        raw = vars(klass).get(attr)
        if raw is None:
            continue
        target = raw.fget if isinstance(raw, property) else getattr(raw, "__func__", raw)
        if (getattr(target, "__doc__", None) or "").strip():
            return True
    return False


@pytest.mark.parametrize("qual,obj", _public(), ids=lambda x: x if isinstance(x, str) else "")
def test_public_item_and_its_public_members_are_documented(qual, obj):
    assert (inspect.getdoc(obj) or "").strip(), qual
    if not inspect.isclass(obj) or not obj.__module__.startswith("hypergradient"):
        return
    missing = []
    for klass in obj.__mro__:
        if not klass.__module__.startswith("hypergradient"):
            continue
        for attr, raw in vars(klass).items():
            if attr.startswith("_") or not (callable(raw) or isinstance(raw, property)):
                continue
            if inspect.isclass(raw):
                continue
            if not _documented(obj, attr):
                missing.append(attr)
    assert not missing, f"{qual}: undocumented {sorted(set(missing))}"
