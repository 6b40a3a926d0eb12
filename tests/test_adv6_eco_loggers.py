"""Adversarial checks of the logging sinks: arguments that were silently ignored or failed
deep inside, and (held) what a resumed run and odd hyperparameter names write, read back
with tensorboard's event reader and ``csv`` and compared with the hyper-optimizer's
records."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.integrations import CSVLogger, ProgressBar, TensorBoardLogger, record_scalars
from test_hyperoptimizer_support import BCE, DT, VAL, batches, build, mlp, run, weights


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_a_writer_and_a_log_dir_together_are_refused(tmp_path):
    """The writer won and ``log_dir`` was silently ignored: the events went elsewhere."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "a")
    with pytest.raises(ValueError, match="`log_dir` or `writer`, not both"):
        TensorBoardLogger(tmp_path / "b", writer=writer)
    assert not (tmp_path / "b").exists()
    writer.close()
    with pytest.raises(hg.ArgumentTypeError, match="`log_dir` must be a directory path"):
        TensorBoardLogger(0.1)  # made a folder named "0.1"


def test_a_prefix_of_slashes_means_no_prefix(tmp_path):
    """prefix="/" made every tag start with a slash ("/loss/val")."""
    pytest.importorskip("tensorboard")
    with TensorBoardLogger(tmp_path, prefix="/") as tb:
        _, hopt = build(inner_steps=2, logger=tb)
        run(hopt, batches(4))
    scalars = _events(tmp_path).Tags()["scalars"]
    assert "loss/val" in scalars and not any(t.startswith("/") for t in scalars)
    values = [e.value for e in _events(tmp_path).Scalars("loss/val")]
    assert values == [torch.tensor(r.val_loss, dtype=torch.float32).item() for r in hopt.history]


def test_record_scalars_checks_its_limit():
    """scalar_limit="8" raised TypeError: '<=' not supported between 'int' and 'str'; 0
    was taken (the loggers refuse it)."""
    records = []
    _, hopt = build(inner_steps=2, logger=records.append)
    run(hopt, batches(2))
    with pytest.raises(hg.ArgumentTypeError, match="`scalar_limit`"):
        record_scalars(records[-1], scalar_limit="8")
    with pytest.raises(ValueError, match="`scalar_limit` must be an integer >= 1"):
        record_scalars(records[-1], scalar_limit=0)
    assert record_scalars(records[-1], scalar_limit=24)["hparams/decay/23"] == pytest.approx(
        float(records[-1].hparams["decay"].reshape(-1)[23]), rel=0, abs=0
    )


def _odd_run(logger):
    """Hyperparameters with unicode, comma, quote and newline names, 0-d, 1, 8 and 9
    elements, a holdout split."""
    from test_holdout import HOLD

    names = ["λ décay", 'a,b"c', "sc\nal", "big"]
    model = mlp()
    hp = {
        "decay": hg.Positive(torch.full((4, 6), 1e-2, dtype=DT)),
        names[0]: torch.tensor(0.5, dtype=DT, requires_grad=True),
        names[1]: torch.tensor([0.1], dtype=DT, requires_grad=True),
        names[2]: torch.ones(8, dtype=DT, requires_grad=True),
        names[3]: torch.ones(9, dtype=DT, requires_grad=True),
    }

    def train_loss(m, h, b):
        s = sum(h[n].sum() for n in names)
        fit = BCE(m(b[0]).reshape(-1), b[1]) + 0.5 * (h["decay"] * weights(m) ** 2).sum()
        return fit + 1e-3 * s * m[0].bias.sum()

    return hg.HyperOptimizer(
        model,
        hp,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=train_loss,
        val_loss=lambda m, h, b: BCE(m(b[0]).reshape(-1), b[1]),
        val_data=VAL,
        holdout_data=HOLD,
        method=hg.IFT(hg.CG(maxiter=4), damping=1.0),
        inner_steps=2,
        history_size=None,
        logger=logger,
    )


def test_odd_names_and_a_resumed_run_write_every_record_exactly(tmp_path):
    """Held: after a checkpoint, a new hyper-optimizer and ``CSVLogger(append=True)``, a new
    ``TensorBoardLogger`` on the same directory: one row and one event per record, steps
    continuing, every number the record's (CSV exactly, TensorBoard as float32)."""
    pytest.importorskip("tensorboard")
    path, data = tmp_path / "run.csv", batches(8)
    with TensorBoardLogger(tmp_path) as tb:
        first = _odd_run([CSVLogger(path), tb])
        run(first, data[:4])
    state = first.state_dict()
    weights_ = {k: v.clone() for k, v in first.view.module.state_dict().items()}
    with TensorBoardLogger(tmp_path) as tb:
        second = _odd_run([CSVLogger(path, append=True), tb])
        second.view.module.load_state_dict(weights_)
        second.load_state_dict(state)
        run(second, data[4:])
    records = list(second.history)
    assert [(r.step, r.hyper_step) for r in records] == [(2, 1), (4, 2), (6, 3), (8, 4)]
    rows = CSVLogger(path, append=True).rows()
    steps = [(int(r["step"]), int(r["hyper_step"])) for r in rows]
    assert steps == [(2, 1), (4, 2), (6, 3), (8, 4)]
    events = _events(tmp_path)
    for name in record_scalars(records[0]):
        assert [e.step for e in events.Scalars("hypergradient/" + name)] == [2, 4, 6, 8]
    for row, record in zip(rows, records):
        for name, value in record_scalars(record).items():
            assert float(row[name]) == value, name
            if name != "time/seconds":
                got = events.Scalars("hypergradient/" + name)[record.hyper_step - 1].value
                assert got == torch.tensor(value, dtype=torch.float32).item(), name
    assert "hparams/sc\nal/7" in rows[0] and "hparams/big/norm" in rows[0]
    assert float(rows[-1]["hparams/λ décay"]) == float(records[-1].hparams["λ décay"])


def test_progress_bar_checks_its_total():
    """total="3" failed inside tqdm (TypeError: can only concatenate str (not "float") to
    str); 2.5, -1 and True were taken."""
    for bad in ("3", 2.5, True):
        with pytest.raises(hg.ArgumentTypeError, match="`total`"):
            ProgressBar(total=bad, disable=True)
    with pytest.raises(ValueError, match="`total` must be an integer >= 0"):
        ProgressBar(total=-1, disable=True)
    assert ProgressBar(total=None, disable=True).bar.total is None


def test_every_logger_can_be_closed_and_used_as_a_context_manager(tmp_path):
    """CSVLogger had no close() (AttributeError in code closing all its loggers) and no
    ``with`` form, unlike TensorBoardLogger and ProgressBar."""
    with CSVLogger(tmp_path / "run.csv") as log:
        _, hopt = build(inner_steps=2, logger=log)
        run(hopt, batches(4))
    log.close()
    rows = log.rows()
    assert [float(r["loss/val"]) for r in rows] == [r.val_loss for r in hopt.history]


def test_loggers_sharing_a_file_keep_every_row_under_its_columns(tmp_path):
    """Each CSVLogger trusted the columns it had seen: after a second logger started the
    file anew, the first appended a header-less row, which the second's first write then
    dropped (one row of two records left)."""
    path = tmp_path / "hyper.csv"
    a = CSVLogger(path)
    _, ha = build(inner_steps=2, logger=a)
    run(ha, batches(4))
    b = CSVLogger(path)  # a new file (append=False): a's two rows are gone, as asked
    _, hb = build(inner_steps=2, logger=b)
    run(ha, batches(2))
    run(hb, batches(2))
    rows = a.rows()
    want = [ha.history[-1], hb.history[-1]]
    assert [(int(r["hyper_step"]), float(r["loss/val"])) for r in rows] == [
        (r.hyper_step, r.val_loss) for r in want
    ]
    for row, record in zip(rows, want):
        assert all(float(row[k]) == v for k, v in record_scalars(record).items())
    path.unlink()  # removed while the run goes on: started again with its header
    run(hb, batches(2))
    assert [int(r["hyper_step"]) for r in b.rows()] == [2]


def test_two_hyperparameters_logged_under_one_name_are_refused(tmp_path):
    """ "w" (2 elements) writes hparams/w/0 and hparams/w/1, and "w/1" (a scalar) wrote
    hparams/w/1 over w[1]: the CSV and TensorBoard showed 7.0 for w[1] = 2.0."""
    model = mlp()
    log = CSVLogger(tmp_path / "run.csv")
    hopt = hg.HyperOptimizer(
        model,
        {
            "w": torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True),
            "w/1": torch.tensor(7.0, dtype=DT, requires_grad=True),
        },
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=lambda m, h, b: (
            BCE(m(b[0]).reshape(-1), b[1]) + 1e-3 * (h["w"].sum() + h["w/1"]) * m[0].bias.sum()
        ),
        val_loss=lambda m, h, b: BCE(m(b[0]).reshape(-1), b[1]),
        val_data=VAL,
        method=hg.IFT(hg.CG(maxiter=3), damping=1.0),
        inner_steps=2,
        logger=log,
    )
    with pytest.raises(ValueError, match=r"'w' and 'w/1' would both be logged as 'hparams/w/1'"):
        run(hopt, batches(2))
    assert log.rows() == [] and hopt.hyper_steps == 0  # the hyper-step was rolled back
