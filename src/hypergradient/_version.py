"""The package version: the one place it is written.

``pyproject.toml`` reads it for the distribution's metadata
(``[tool.setuptools.dynamic] version``) and ``hypergradient.__version__`` re-exports it.
"""

__version__ = "0.1.0"
