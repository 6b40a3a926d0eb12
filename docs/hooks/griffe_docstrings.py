"""Griffe extension: read the project's docstring conventions as mkdocstrings renders them.

The docstrings are Google style with a few reStructuredText habits, which this extension
rewrites before griffe parses them (the source is not changed):

- Entries that document several parameters at once, ``low, high: the bounds`` or
  ``seed / generator: ...`` (numpydoc's ``x, y : type`` convention, which Napoleon reads
  too), become one entry per name: the first keeps the description, the others point to
  it. Griffe's Google parser would otherwise read ``low, high`` as one unknown name and warn
  that it is not in the signature; with this, that check stays on for real mismatches.
- Sphinx roles (``:class:`~hypergradient.Positive```, ``:func:`implicit```) become code
  spans (``Positive``, ``implicit``).
- ``.. math::`` directives become an indented (code) block of the LaTeX source, and a
  paragraph ending in ``::`` (a reST literal block) ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|"
    r"Other Parameters|Attributes):\s*$"
)
_NAME = r"\*{0,2}[A-Za-z_]\w*"
_ENTRY = re.compile(rf"^(\s*)({_NAME}(?:\s*(?:,|/)\s*{_NAME})+)(\s*\([^)]*\))?:(\s.*|$)")


def split_combined_entries(text: str) -> str:
    """Rewrite ``a, b: description`` entries of argument sections as one entry per name."""
    lines = text.split("\n")
    out: list[str] = []
    in_section = False
    section_indent = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if _SECTION.match(line):
            in_section, section_indent = True, indent
            out.append(line)
            i += 1
            continue
        if in_section and line.strip() and indent <= section_indent:
            in_section = False
        match = _ENTRY.match(line) if in_section else None
        if match is None:
            out.append(line)
            i += 1
            continue
        pad, names, annotation, rest = match.groups()
        first, *others = [n.strip() for n in re.split(r"\s*(?:,|/)\s*", names)]
        out.append(f"{pad}{first}{annotation or ''}:{rest}")
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(pad)
        ):
            out.append(lines[i])
            i += 1
        out.extend(f"{pad}{name}: See `{first}`." for name in others)
    return "\n".join(out)


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if "`~" in match.group(0) else target
    return f"`{shown}`"


def rest_to_markdown(text: str) -> str:
    """Sphinx roles to code spans, ``.. math::`` to a code block, ``::`` to ``:``."""
    text = _ROLE.sub(_role, text)
    lines = []
    for line in text.split("\n"):
        if line.strip() == ".. math::":
            lines.append("")
        elif line.rstrip().endswith("::") and not line.strip().startswith(">>>"):
            lines.append(line.rstrip()[:-1])
        else:
            lines.append(line)
    return "\n".join(lines)


class ProjectDocstrings(griffe.Extension):
    """Split combined parameter entries; turn reST roles and directives into Markdown."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = split_combined_entries(obj.docstring.value)
            obj.docstring.value = rest_to_markdown(text)
