"""docs/api/index.md says everything is importable from the package root except the
subpackages' names it lists; the reference also documents ``hypergradient.solvers.
AutoDamping`` (and four more of ``hg.solvers``), the ``hypergradient.hyperoptimizer``
collaborators and ``hypergradient.integrations``, which the list left out. Every documented
identifier is now either a root export or under a subpackage the index names.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hypergradient as hg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_docs import DOCS, _documented, _resolve  # noqa: E402


def test_every_documented_name_is_a_root_export_or_under_a_listed_subpackage():
    index = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    first = index.split("\n\n")[1]  # the paragraph with the exceptions
    listed = set()
    for m in re.findall(r"`([\w.*]+)`", first):
        if m.startswith(("hg.", "hypergradient.")):
            name = re.sub(r"^hg\.", "hypergradient.", m)
            # `pkg.*` names the package; `pkg.Name` a member of it
            listed.add(name[:-2] if name.endswith(".*") else name.rsplit(".", 1)[0])
    assert "hypergradient" not in listed and "hypergradient.compat" in listed
    root = {id(getattr(hg, n)) for n in hg.__all__}
    outside = []
    for identifier in sorted(_documented()):
        if id(_resolve(identifier)) in root or identifier.count(".") == 1:
            continue
        if not any(identifier == p or identifier.startswith(p + ".") for p in listed):
            outside.append(identifier)
    assert not outside, f"documented, not in the root, not under a listed subpackage: {outside}"


def test_home_page_names_what_takes_a_process_group():
    """docs/index.md said ``process_group=`` works "on all of the above", MAML, iMAML and the
    compatibility layers included, which take none."""
    import inspect

    import hypergradient.compat.hippotrainer as hippo
    from hypergradient.compat.hypergrad import approx_hypergrad

    text = (DOCS / "index.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| several processes"))
    named = re.findall(r"`hg\.(\w+)`", row.split("(not on")[0])
    assert len(named) == 5
    for name in named:
        assert "process_group" in inspect.signature(getattr(hg, name)).parameters, name
    for fn in (hg.meta.MAML, hg.meta.IMAML, hg.meta.maml_step, hg.meta.imaml_step):
        assert "process_group" not in inspect.signature(fn).parameters
    for fn in (hippo.HyperOptimizer, approx_hypergrad.conjugate_gradient):
        assert "process_group" not in inspect.signature(fn).parameters


def test_integrations_page_states_every_divergence_rule():
    """The page named two of the three growth rules the divergence watch applies (it left
    out the loss growing 1.4x while the norm grows 1.15x, momentum just past its limit)."""
    from hypergradient.hyperoptimizer import divergence
    from hypergradient.methods import growth

    text = re.sub(r"\s+", " ", (DOCS / "api" / "integrations.md").read_text(encoding="utf-8"))
    rule = re.search(
        r"geometric growth \(the norm (\w+), the loss (\w+) while the norm grows, or the loss "
        r"growing ([\d.]+)x while the norm grows ([\d.]+)x, at each of the last (\w+) steps\)",
        text,
    )
    assert rule is not None
    words = {"doubling": 2.0, "tripling": 3.0, "three": 3}
    assert words[rule.group(1)] == divergence.PARAM_GROWTH
    assert words[rule.group(2)] == growth.LOSS_GROWTH
    assert (float(rule.group(3)), float(rule.group(4))) == divergence.BOTH_GROWTH
    assert words[rule.group(5)] == growth.KEEP - 1  # KEEP values: KEEP - 1 growth ratios
