"""The benchmarks' shared harness: problems, an interleaved runner, one report writer.

Every public name of :mod:`.problems`, :mod:`.report` and :mod:`.runner` is importable from
here (``import harness as H; H.table(...)``).
"""

from . import problems, report, runner  # noqa: F401
from .problems import *  # noqa: F403
from .report import *  # noqa: F403
from .runner import *  # noqa: F403
