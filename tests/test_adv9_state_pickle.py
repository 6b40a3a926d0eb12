"""A whole hyper-optimizer pickles (``pickle``, ``torch.save(hopt)``, multiprocessing) in
the middle of a trajectory window, and the copy goes on as the original, bit for bit.

The window kept weak references to the last step's gradients (to tell a loop that zeroes
with ``set_to_none=False``), which ``pickle`` refuses: ``TypeError: cannot pickle
'weakref.ReferenceType' object`` at any step but a hyper-step's, for Unrolled, ForwardMode
and DrMAD.

A ``TensorBoardLogger`` (the writer's lock) and a live ``DataLoader`` as ``val_data`` (its
iterator) did not pickle at all: ``TypeError: cannot pickle '_thread.lock' object``,
``NotImplementedError: _SingleProcessDataLoaderIter cannot be pickled``."""

from __future__ import annotations

import copy
import io
import pickle
import random
import sys

import numpy as np
import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import VAL, assert_same, batches, build, everything, mlp, run

METHODS = {"Unrolled": hg.Unrolled, "ForwardMode": hg.ForwardMode, "DrMAD": hg.DrMAD}


def _torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _torch_save,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(METHODS))
def test_a_copy_made_mid_window_continues_as_the_original(name, how):
    model, hopt = build(METHODS[name](), model=mlp(dropout=0.2))
    steps = batches(10)
    run(hopt, steps[:4])  # one hyper-step (inner_steps=3), one step into the next window
    assert len(hopt.loop.window) == 1
    model2, hopt2 = COPIES[how]((model, hopt))
    rng = torch.get_rng_state()
    run(hopt, steps[4:])
    torch.set_rng_state(rng)
    run(hopt2, steps[4:])
    assert hopt.hyper_steps == hopt2.hyper_steps == 3 and hopt.skipped == 0
    assert_same(everything(model, hopt), everything(model2, hopt2))


def test_a_hyper_optimizer_logging_to_a_list_of_loggers_pickles(tmp_path):
    """The list's sinks were joined by a closure: ``Can't pickle local object
    '_as_sink.<locals>.fan_out'``, though every logger in it pickles."""
    from hypergradient.integrations import CSVLogger

    path = tmp_path / "run.csv"
    model, hopt = build(logger=[CSVLogger(path), CSVLogger(tmp_path / "copy.csv")])
    run(hopt, batches(3))
    model2, hopt2 = pickle.loads(pickle.dumps((model, hopt)))
    steps = batches(3, seed=4)
    rng = torch.get_rng_state()
    run(hopt, steps)
    torch.set_rng_state(rng)
    run(hopt2, steps)
    assert_same(everything(model, hopt), everything(model2, hopt2))
    # both wrote their second hyper-step here: the copy's first row replaced the original's
    # (a copy drops the rows after the last one it had written: a resumed run's redone ones)
    rows = CSVLogger(path, append=True).rows()
    assert [r["hyper_step"] for r in rows] == ["1", "2"]
    assert rows[1]["step"] == "6"


class Augmented(torch.utils.data.Dataset):
    """The validation rows with noise drawn from torch's random-number state."""

    def __len__(self):
        return len(VAL[1])

    def __getitem__(self, i):
        return VAL[0][i] + 0.1 * torch.randn(VAL[0].shape[1], dtype=VAL[0].dtype), VAL[1][i]


LOADERS = {
    "in order": lambda ds: torch.utils.data.DataLoader(ds, batch_size=16),
    "shuffled": lambda ds: torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True),
    "own generator": lambda ds: torch.utils.data.DataLoader(
        ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7)
    ),
    "augmented": lambda ds: torch.utils.data.DataLoader(Augmented(), batch_size=16, shuffle=True),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_copy_continues_the_pass_of_a_data_loader(kind, how):
    """The copy is made two batches into a pass of three; it draws the third, then the
    next pass (a new random order) as the original does. A fresh pass in the copy would
    draw the first batch again (another hypergradient); and the pass started again from
    torch's state at the copy's first draw, not the pass's, another order (the training
    steps' dropout moves torch's state between hyper-steps)."""
    loader = LOADERS[kind](torch.utils.data.TensorDataset(*VAL))
    model, hopt = build(model=mlp(dropout=0.2), val_data=loader, val_batch_size=None)
    steps = batches(16)
    run(hopt, steps[:7])  # hyper-steps at steps 3 and 6: two batches of the pass drawn
    model2, hopt2 = COPIES[how]((model, hopt))
    rng = torch.get_rng_state()
    run(hopt, steps[7:])
    torch.set_rng_state(rng)
    run(hopt2, steps[7:])
    assert hopt.hyper_steps == hopt2.hyper_steps == 5 and hopt.val_sampler.drawn == 5
    assert_same(everything(model, hopt), everything(model2, hopt2))


class Noisy(Augmented):
    """Noise from torch's, Python's and numpy's random-number states."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + random.random() + float(np.random.rand()), y  # noqa: NPY002


def _states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()  # noqa: NPY002


def test_the_copy_of_a_sampler_draws_the_original_s_batches_and_changes_no_rng():
    """Checked batch by batch, across a pass's end; the batches the copy skips draw from
    torch's, Python's and numpy's states, and leave each as it was."""
    loader = torch.utils.data.DataLoader(Noisy(), batch_size=16, shuffle=True)
    sampler = hg.hyperoptimizer.BatchSampler(loader, name="val_data")
    sampler.next(), sampler.next()
    copied = pickle.loads(pickle.dumps(sampler))
    before = _states()
    mine = [copied.next() for _ in range(4)]
    after = _states()
    torch.set_rng_state(before[0])
    random.setstate(before[1])
    np.random.set_state(before[2])  # noqa: NPY002
    theirs = [sampler.next() for _ in range(4)]
    assert_same(mine, theirs)
    assert torch.equal(after[0], _states()[0]) and after[1] == _states()[1]
    assert all(np.array_equal(a, b) for a, b in zip(after[2][1:], _states()[2][1:]))


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("given", [False, True], ids=["log_dir", "writer"])
def test_a_hyper_optimizer_logging_to_tensorboard_copies(tmp_path, how, given):
    """The copy opens a writer on the same directory (and settings) at its first record,
    writes there what the original writes, and closes only its own writer."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from hypergradient.integrations import TensorBoardLogger

    writer = SummaryWriter(tmp_path, flush_secs=7, filename_suffix=".x") if given else None
    tb = TensorBoardLogger(writer=writer) if given else TensorBoardLogger(tmp_path)
    model, hopt = build(logger=tb)
    run(hopt, batches(4))  # hyper-step at step 3
    model2, hopt2, tb2 = COPIES[how]((model, hopt, tb))
    assert len(list(tmp_path.iterdir())) == 1 and repr(tb2) == repr(tb)
    steps = batches(6, seed=4)
    rng = torch.get_rng_state()
    run(hopt, steps)  # hyper-steps at steps 6 and 9
    torch.set_rng_state(rng)
    run(hopt2, steps)
    assert_same(everything(model, hopt), everything(model2, hopt2))
    assert tb2.owns_writer and tb2.writer is not tb.writer
    assert (tb2.writer.flush_secs, tb2.writer.filename_suffix) == (
        (7, ".x") if given else (120, "")
    )
    tb2.close()
    tb.close()
    assert (writer.file_writer is not None) if given else True  # the user's: still open
    files = list(tmp_path.iterdir())
    assert len(files) == 2

    def curve(path):
        ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
        ea.Reload()
        return [(e.step, e.value) for e in ea.Scalars("hypergradient/loss/val")]

    copy_, original = sorted(map(curve, files), key=len)
    assert [s for s, _ in original] == [3, 6, 9] and original[1:] == copy_
    if given:
        writer.close()


def test_a_copy_of_a_tensorboard_logger_that_writes_nothing_opens_no_file(tmp_path):
    pytest.importorskip("tensorboard")
    from hypergradient.integrations import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path / "run")
    copied = copy.deepcopy(tb)
    copied.flush()
    copied.close()
    assert len(list((tmp_path / "run").iterdir())) == 1
    tb.close()


@pytest.mark.parametrize("how", list(COPIES))
def test_a_hyper_optimizer_with_a_progress_bar_copies(how):
    """The bar's stream did not pickle (``cannot pickle '_io.TextIOWrapper' object``); the
    copy's bar opens at the original's count and goes on counting."""
    pytest.importorskip("tqdm")
    from hypergradient.integrations import ProgressBar

    bar = ProgressBar(total=5, desc="tuning", file=io.StringIO(), mininterval=0)
    model, hopt = build(logger=bar)
    run(hopt, batches(4))
    with pytest.warns(UserWarning, match=r"`file=` \(StringIO"):  # the copy's: sys.stderr
        model2, hopt2, bar2 = COPIES[how]((model, hopt, bar))
    assert repr(bar2) == repr(bar) == "ProgressBar(n=1, total=5)"
    steps = batches(6, seed=4)
    rng = torch.get_rng_state()
    run(hopt, steps)
    torch.set_rng_state(rng)
    run(hopt2, steps)
    assert_same(everything(model, hopt), everything(model2, hopt2))
    assert (
        (bar2.bar.n, bar2.bar.total, bar2.bar.desc) == (bar.bar.n, 5, "tuning") == (3, 5, "tuning")
    )
    bar2.close()
    bar.close()


@pytest.mark.parametrize("at", [7, 13], ids=["first pass", "second pass"])
def test_a_copy_continues_the_pass_of_a_loader_with_persistent_workers(at):
    """``DataLoader(persistent_workers=True)`` keeps its live iterator (its worker processes)
    in ``loader._iterator``: ``NotImplementedError: _MultiProcessingDataLoaderIter cannot be
    pickled``. The copy starts its own worker at its first draw and draws the original's
    batches: in the iterator's first pass, and in a later one, which the original's
    iterator starts as a restart of its workers (no new base seed drawn from torch's state:
    a fresh iterator in the copy would shuffle from another state)."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*VAL),
        batch_size=16,
        shuffle=True,
        num_workers=1,
        persistent_workers=True,
    )
    model, hopt = build(model=mlp(dropout=0.2), val_data=loader, val_batch_size=None)
    steps = batches(at + 9)
    run(hopt, steps[:at])  # the copy: 2 batches into the first pass of 3, or 1 into the second
    model2, hopt2 = pickle.loads(pickle.dumps((model, hopt)))
    assert loader._iterator is not None and hopt2.val_sampler.iterable._iterator is None
    rng = torch.get_rng_state()
    run(hopt, steps[at:])  # the copy goes on into the pass after it
    torch.set_rng_state(rng)
    run(hopt2, steps[at:])
    assert hopt.hyper_steps == hopt2.hyper_steps == (at + 9) // 3
    assert_same(everything(model, hopt), everything(model2, hopt2))
    assert hopt2.val_sampler.iterable._iterator is not None  # its own worker


def _scalars(run_dir):
    """Every scalar and histogram of a TensorBoard run directory, as TensorBoard shows it
    (after its purges): tag -> [(step, value)] (a histogram's value: its sum)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    out = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in tags["scalars"]}
    hist = {
        t: [(e.step, e.histogram_value.sum) for e in ea.Histograms(t)] for t in tags["histograms"]
    }
    return out | {f"histogram {t}": curve for t, curve in hist.items()}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("copied_at", [4, 2], ids=["after a record", "before any record"])
def test_a_run_resumed_from_a_copy_replaces_the_redone_steps_in_tensorboard(
    tmp_path, how, copied_at
):
    """A checkpoint (the copy) at step 4, one hyper-step logged at step 3; the original goes
    on to steps 6 and 9, then crashes; the run resumes from the checkpoint on other batches
    (other values). TensorBoard showed two values at steps 6 and 9 (the crashed run's and
    the resumed run's); now one, the resumed run's, for every scalar of the logger, and the
    step-3 values of the original stay. Copied before any record (step 2), the copy purges
    from its first record's step."""
    pytest.importorskip("tensorboard")
    from hypergradient.integrations import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path / "run")
    model, hopt = build(logger=tb)
    run(hopt, batches(copied_at))
    model2, hopt2, tb2 = COPIES[how]((model, hopt, tb))
    run(hopt, batches(10 - copied_at, seed=4))  # records at steps 6 and 9, then a "crash"
    tb.close()
    crashed = _scalars(tmp_path / "run")
    run(hopt2, batches(10 - copied_at, seed=5))  # the resumed run: other batches
    tb2.close()
    shown = _scalars(tmp_path / "run")
    files = sorted((tmp_path / "run").iterdir())
    assert len(files) == 2
    resumed = _scalars(files[1])  # the copy's own event file
    assert set(shown) == set(crashed) and len(shown) > 10
    assert "histogram hypergradient/hparams/decay" in shown
    kept = 1 if copied_at == 4 else 0  # the original's record at step 3 (before the copy)
    for tag, curve in shown.items():
        assert [s for s, _ in curve] == [3, 6, 9], tag
        assert curve[:kept] == crashed[tag][:kept] and curve[kept:] == resumed[tag], tag
    loss = "hypergradient/loss/val"
    assert [v for _, v in crashed[loss][1:]] != [v for _, v in resumed[loss][-2:]]


try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # the tests that use them are skipped
    SummaryWriter = object


class HParamsWriter(SummaryWriter):
    """A user's writer class, with a constructor argument of its own."""

    def __init__(self, log_dir=None, *, run_name="tuning", **kwargs):
        super().__init__(log_dir, **kwargs)
        self.run_name = run_name


class FixedWriter(SummaryWriter):
    """A writer class whose constructor takes none of SummaryWriter's settings."""

    def __init__(self, log_dir):
        super().__init__(log_dir)


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_keeps_the_class_of_the_user_s_writer(tmp_path, how):
    """The copy reopened a plain SummaryWriter: the user's subclass (its methods) was lost.
    Its own constructor arguments, which the logger does not know, take their defaults."""
    pytest.importorskip("tensorboard")
    from hypergradient.integrations import TensorBoardLogger

    writer = HParamsWriter(tmp_path, run_name="mine", flush_secs=7)
    tb = TensorBoardLogger(writer=writer)
    model, hopt = build(logger=tb)
    run(hopt, batches(4))
    _, hopt2, tb2 = COPIES[how]((model, hopt, tb))
    run(hopt2, batches(3, seed=4))
    assert type(tb2.writer) is HParamsWriter and tb2.writer is not writer
    assert (tb2.writer.flush_secs, tb2.writer.run_name, tb2.writer.log_dir) == (
        7,
        "tuning",
        writer.log_dir,
    )
    tb2.close()
    writer.close()


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_writer_class_that_cannot_be_reopened_is_refused_when_copied(tmp_path, how):
    pytest.importorskip("tensorboard")
    from hypergradient.integrations import TensorBoardLogger

    writer = FixedWriter(tmp_path)
    tb = TensorBoardLogger(writer=writer)
    with pytest.raises(TypeError, match=r"FixedWriter\(log_dir=.*purge_step=.*\*\*kwargs"):
        COPIES[how](tb)
    assert tb.writer is writer and tb.owns_writer is False  # nothing changed
    writer.close()


def test_a_progress_bar_copy_writes_to_the_same_standard_stream(capsys):
    """The copy wrote to tqdm's default, sys.stderr, whatever ``file=`` was."""
    pytest.importorskip("tqdm")
    from hypergradient.integrations import ProgressBar

    bar = ProgressBar(total=5, desc="tuning", file=sys.stdout, mininterval=0)
    bar.bar.update(1)
    copied = pickle.loads(pickle.dumps(bar))
    bar.close()
    capsys.readouterr()
    copied.bar.update(1)
    copied.close()
    out, err = capsys.readouterr()
    assert "tuning" in out and "2/5" in out and err == ""


@pytest.mark.parametrize("how", list(COPIES))
def test_a_progress_bar_copy_appends_to_the_same_file(tmp_path, monkeypatch, how):
    """``file=`` a file opened from a (relative) path: the copy appends to it (made absolute
    when copied: the copy may be used from another folder), and closes what it opened."""
    pytest.importorskip("tqdm")
    from hypergradient.integrations import ProgressBar

    monkeypatch.chdir(tmp_path)
    with open("bar.txt", "w", encoding="utf-8") as f:
        bar = ProgressBar(total=5, desc="tuning", file=f, mininterval=0)
        model, hopt = build(logger=bar)
        run(hopt, batches(4))
        model2, hopt2, bar2 = COPIES[how]((model, hopt, bar))
        bar.close()
    before = (tmp_path / "bar.txt").read_text(encoding="utf-8")
    assert "1/5" in before and "3/5" not in before
    monkeypatch.chdir(tmp_path.parent)
    run(hopt2, batches(6, seed=4))
    bar2.close()
    after = (tmp_path / "bar.txt").read_text(encoding="utf-8")
    assert after.startswith(before) and "3/5" in after[len(before) :]
    assert bar2._opened.closed


def test_curves_of_one_s_own_written_through_the_copy_s_writer_survive_the_purge(tmp_path):
    """The documented way to log one's own curves in a resumed run (through the copy's
    ``writer``), and the documented gap: the step between the last record (3) and the copy
    (4) is hidden, and not written again."""
    pytest.importorskip("tensorboard")
    from hypergradient.integrations import TensorBoardLogger

    def train(hopt, tb, steps, first, offset):
        for i, batch in enumerate(steps, start=first):
            hopt.zero_grad()
            loss = hopt.train_loss(batch)
            loss.backward()
            hopt.step(batch)
            tb.writer.add_scalar("train/loss", loss.item() + offset, i)

    tb = TensorBoardLogger(tmp_path, histograms=False)
    model, hopt = build(logger=tb)
    train(hopt, tb, batches(4), 1, 0.0)
    _, hopt2, tb2 = pickle.loads(pickle.dumps((model, hopt, tb)))
    train(hopt, tb, batches(6, seed=4), 5, 0.0)  # steps 5-10, then a crash
    tb.close()
    train(hopt2, tb2, batches(6, seed=4), 5, 100.0)  # the resumed run (told apart: +100)
    tb2.close()
    shown = _scalars(tmp_path)
    steps = [s for s, _ in shown["train/loss"]]
    assert steps == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert all(v < 100 for _, v in shown["train/loss"][:3])
    assert all(v > 100 for _, v in shown["train/loss"][3:])
    assert [s for s, _ in shown["hypergradient/loss/val"]] == [3, 6, 9]
