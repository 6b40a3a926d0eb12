"""The package builds into a wheel that installs and imports in a clean environment.

The wheel is built from a copy of the sources (``pip wheel --no-deps``, the README's path;
without build isolation when setuptools is already installed, so no network is needed)
and installed into a fresh virtual environment that has no site packages of its own. torch
comes from the running environment through a ``.pth`` line (installing torch again would
take most of the time), so ``import hypergradient`` there can only find the installed
wheel. Also checked: one source for the version, the licence, ``py.typed``, and that
CITATION.cff and CHANGELOG.md describe the current version. About 10-20 s.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import hypergradient

ROOT = Path(__file__).resolve().parent.parent
VERSION_FILE = ROOT / "src" / "hypergradient" / "_version.py"


def _source_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', VERSION_FILE.read_text(), re.MULTILINE)
    assert match, f'{VERSION_FILE} must assign __version__ = "X.Y.Z"'
    return match.group(1)


def _setuptools_ready() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the source tree stays untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    isolation = ["--no-build-isolation"] if _setuptools_ready() else []
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation]
        + ["-w", str(work / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    wheels = list((work / "dist").glob("hypergradient-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel: Path) -> None:
    version = _source_version()
    assert wheel.name == f"hypergradient-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"hypergradient-{version}.dist-info/METADATA").decode()
        licence = archive.read(f"hypergradient-{version}.dist-info/licenses/LICENSE").decode()
    assert "hypergradient/py.typed" in names
    assert "hypergradient/_version.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "\nLicense-File: LICENSE\n" in metadata
    assert licence == (ROOT / "LICENSE").read_text()


def test_wheel_installs_and_imports_in_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # torch (and its dependencies) from this environment, appended after the venv's own
    # site-packages; .pth files of that directory (an editable install) are not processed.
    torch_site = Path(torch.__file__).resolve().parent.parent
    (Path(site) / "torch_from_test_env.pth").write_text(f"{torch_site}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
        + ["--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    probe = (
        "import json, importlib.metadata as md, pathlib, hypergradient as hg, torch\n"
        "dist = md.distribution('hypergradient')\n"
        "package = pathlib.Path(hg.__file__).parent\n"
        "print(json.dumps({'version': hg.__version__, 'metadata': dist.version,\n"
        "  'file': str(package), 'typed': (package / 'py.typed').is_file(),\n"
        "  'licence': [str(f) for f in dist.files if f.name == 'LICENSE'],\n"
        "  'license_expression': dist.metadata['License-Expression'],\n"
        "  'works': float(hg.implicit(lambda p, h: ((p - h) ** 2).sum(),\n"
        "      lambda p, h: (p ** 2).sum(), torch.ones(2), torch.ones(2)).sum())}))\n"
    )
    done = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    version = _source_version()
    assert found["version"] == found["metadata"] == version
    assert Path(found["file"]).is_relative_to(venv), found["file"]  # the wheel, not src/
    assert found["typed"]
    assert found["licence"] and found["license_expression"] == "MIT"
    # f = |p - h|^2, g = |p|^2: p*(h) = h, dg/dh = 2h = (2, 2)
    assert found["works"] == pytest.approx(4.0, rel=1e-6)


def test_one_source_for_the_version() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.MULTILINE), "version is hard-coded"
    assert re.search(r'^dynamic = \[[^]]*"version"', project, re.MULTILINE)
    assert 'version = {attr = "hypergradient._version.__version__"}' in pyproject
    from hypergradient import _version

    assert hypergradient.__version__ == _version.__version__ == _source_version()


def test_licence_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c)" in text and "hypergradient developers" in text
    assert re.search(r'^license = "MIT"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)


#: (first author's family name, year, a word of the title) of the methods' papers.
PAPERS = [
    ("Pedregosa", 2016, "approximate gradient"),
    ("Lorraine", 2020, "Millions of Hyperparameters"),
    ("Luketina", 2016, "Regularization Hyperparameters"),
    ("Maclaurin", 2015, "Reversible Learning"),
    ("Franceschi", 2017, "Forward and Reverse"),
    ("Shaban", 2019, "Truncated Back-propagation"),
    ("Fu", 2016, "DrMAD"),
    ("Hataya", 2023, "Nyström"),
    ("Rajeswaran", 2019, "Implicit Gradients"),
    ("Finn", 2017, "Model-Agnostic Meta-Learning"),
    ("Baydin", 2018, "Hypergradient Descent"),
]


def test_citation_file() -> None:
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    top = text.split("\nreferences:", 1)[0]
    assert re.search(r"^cff-version: 1\.2\.0$", top, re.MULTILINE)
    assert re.search(r"^type: software$", top, re.MULTILINE)
    assert re.search(rf'^version: "?{re.escape(_source_version())}"?$', top, re.MULTILINE)
    assert re.search(r"^license: MIT$", top, re.MULTILINE)
    entries = text.split("\nreferences:", 1)[1].split("\n  - type: ")[1:]
    for family, year, title in PAPERS:
        hits = [
            e
            for e in entries
            if f'family-names: "{family}"' in e.split("\n    title:")[0]
            and f"year: {year}" in e
            and title.lower() in e.lower()
        ]
        assert len(hits) == 1, f"CITATION.cff: no single reference for {family} {year}"


def test_changelog_describes_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "Keep a Changelog" in text
    assert re.search(r"^## \[Unreleased\]$", text, re.MULTILINE)
    assert re.search(
        rf"^## \[{re.escape(_source_version())}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.MULTILINE
    )
