"""The benchmarks' shared harness: problems, an interleaved runner, one report writer."""

from . import problems, report, runner
from .problems import Bilevel, cosine, flat, relative_error, unflat
from .report import Report, fix, ms, ratio, sci, table
from .runner import Case, cli, interleave, log, median, start

__all__ = [
    "Bilevel",
    "Case",
    "Report",
    "cli",
    "cosine",
    "fix",
    "flat",
    "interleave",
    "log",
    "median",
    "ms",
    "problems",
    "ratio",
    "relative_error",
    "report",
    "runner",
    "sci",
    "start",
    "table",
    "unflat",
]
