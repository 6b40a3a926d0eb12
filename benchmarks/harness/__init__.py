"""The benchmarks' shared harness: problems, an interleaved runner, one report writer."""

from . import problems, report, runner  # noqa: F401
from .problems import *  # noqa: F403
from .report import *  # noqa: F403
from .runner import *  # noqa: F403
