"""MkDocs hook: publish the committed benchmark results and keep repository links working.

``docs/results.md`` links to the full tables and plots in ``benchmarks/results/`` with
paths relative to the repository (``../benchmarks/results/x.png``), which work when the
Markdown is read on a forge or in an editor. The site gets those files as
``benchmarks/results/*`` (tables rendered as pages, plots copied, and a generated index
page listing them), and page links that leave ``docs/`` for them are rewritten to point
inside the site (a link to the folder itself goes to its index page).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ("benchmarks/results",)
_OUTSIDE = re.compile(
    r"\]\((?:\.\./)+(" + "|".join(re.escape(p) for p in PUBLISHED) + r")/([^)\s]*)\)"
)


def on_files(files: Files, config: Any) -> Files:
    for folder in PUBLISHED:
        listing = [f"# `{folder}/`", "", "The committed outputs of the benchmark scripts.", ""]
        for path in sorted((ROOT / folder).glob("*")):
            if path.suffix in (".md", ".png", ".json", ".svg") and path.is_file():
                uri = f"{folder}/{path.name}"
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
                listing.append(f"- [{path.name}]({path.name})")
        files.append(File.generated(config, f"{folder}/index.md", content="\n".join(listing)))
    return files


def _rewrite(match: re.Match[str], depth: int) -> str:
    rest = match.group(2)
    return "](" + "../" * depth + match.group(1) + "/" + (rest or "index.md") + ")"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    depth = page.file.src_uri.count("/")
    return _OUTSIDE.sub(lambda m: _rewrite(m, depth), markdown)
