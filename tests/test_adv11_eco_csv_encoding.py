"""Adversarial checks of the CSV sink (round 11): the file's encoding was the locale's.

Under a locale whose encoding is not UTF-8 (``LANG=C`` without coercion, Windows' cp1252),
a hyperparameter named ``"λ décay"`` made ``CSVLogger.log`` raise ``UnicodeEncodeError``
(the hyper-step rolled back and training stopped), and a file written in one locale was read
back in another as other characters. The file is now UTF-8 whatever the locale, as
``pandas.read_csv`` (which the docstring suggests) reads it by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypergradient.integrations import CSVLogger

CHILD = textwrap.dedent(
    """
    import json, locale, sys
    sys.path.insert(0, {tests!r})
    import torch
    import hypergradient as hg
    from hypergradient.integrations import CSVLogger, record_scalars
    from test_hyperoptimizer_support import BCE, DT, VAL, batches, mlp, run, weights

    name = "λ décay"
    model = mlp()
    hp = {{name: torch.tensor(0.01, dtype=DT, requires_grad=True)}}

    def train_loss(m, h, b):
        return BCE(m(b[0]).reshape(-1), b[1]) + h[name] * (weights(m) ** 2).sum()

    hopt = hg.HyperOptimizer(
        model, hp, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), train_loss=train_loss,
        val_loss=lambda m, h, b: BCE(m(b[0]).reshape(-1), b[1]), val_data=VAL,
        method=hg.T1T2(), inner_steps=2, logger=CSVLogger({path!r}),
    )
    run(hopt, batches(4))
    hopt.logger = None
    rows = CSVLogger({path!r}, append=True).rows()  # read back in this locale too
    print(json.dumps({{
        "encoding": locale.getpreferredencoding(False),
        "records": [record_scalars(r) for r in hopt.history],
        "rows": rows,
    }}))
    """
)


def test_a_unicode_name_is_written_as_utf8_under_an_ascii_locale(tmp_path):
    tests = str(Path(__file__).parent)
    path = tmp_path / "run.csv"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=tests, path=str(path)), encoding="utf-8")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["encoding"].lower().replace("-", "") in ("utf8", "utf_8"):
        pytest.skip("this platform coerces the C locale to UTF-8")
    records = out["records"]
    assert len(records) == 2 and "hparams/λ décay" in records[0]
    for rows in (out["rows"], CSVLogger(path, append=True).rows()):  # child's, then UTF-8
        assert len(rows) == 2
        for row, record in zip(rows, records):
            for key, value in record.items():
                assert float(row[key]) == value, key
    assert "hparams/λ décay" in path.read_bytes().decode("utf-8")
