"""The hypergradient-descent optimizers import on every supported torch (adversarial probe,
round 6). ``hg.optim.SGDHD`` / ``AdamHD`` imported ``torch.optim.optimizer.ParamsT`` at run
time for an annotation; torch 2.1 (``torch>=2.1`` is the declared floor) calls that alias
``params_t``, so ``import hypergradient`` failed there with ``ImportError: cannot import
name 'ParamsT'``. Simulated in a subprocess by removing the alias before the import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import hypergradient as hg

CODE = textwrap.dedent(
    """
    import sys
    import torch
    import torch.optim.optimizer as tor
    del tor.ParamsT  # as in torch 2.1
    sys.path.insert(0, SRC)
    import hypergradient as hg
    assert hg.__file__.startswith(SRC), hg.__file__
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    for cls in (hg.optim.SGDHD, hg.optim.AdamHD):
        opt = cls([w], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
    print("ok")
    """
)


def test_the_hd_optimizers_import_without_torchs_paramst_alias():
    src = str(Path(hg.__file__).resolve().parents[1])
    code = f"SRC = {src!r}\n" + CODE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
