"""Adversarial checks of the Lightning callback as client code uses it after training and in
set-ups the other tests do not reach: ``Trainer.validate`` on a checkpoint, T1T2 under
manual optimization, ``precision="64-true"``, misspelt options.

References: the checkpoint's own weights and hyperparameters (evaluated directly); the
documented ``HyperOptimizer`` loop; the same run in float64 with float64 data."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback, tuned_values  # noqa: E402
from test_integrations_lightning import DT, TRAIN, VAL, LogReg, callback, loader  # noqa: E402
from test_integrations_lightning import trainer as _trainer  # noqa: E402


def trainer(**kw):
    return _trainer(**{"limit_val_batches": None, **kw})


class Scored(LogReg):
    """Validation logs the penalized loss: a number that depends on the tuned decays."""

    def validation_step(self, batch, batch_idx):
        self.log("penalized", self.training_loss(batch, tuned_values(self)))


def val_loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*VAL), batch_size=40)


def penalized(state_dict, raw):
    """The checkpoint's number: its weights, its raw decays, on the validation rows."""
    module = Scored()
    module.load_state_dict(state_dict)
    module.decay.raw.data.copy_(raw)
    with torch.no_grad():
        return float(module.training_loss(VAL, tuned_values(module)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three epochs; a checkpoint after each. Returns the fitted trainer, module, callback
    and the first epoch's checkpoint path."""
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    folder = tmp_path_factory.mktemp("ckpt")
    cb = HypergradientCallback(  # Adam(lr=0.5): the decays move visibly
        val_data=VAL,
        val_batch_size=16,
        every_n_steps=2,
        method=hg.IFT(hg.CG(maxiter=5), damping=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.5),
    )
    keep = L.callbacks.ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)
    fitted = trainer(max_epochs=3, callbacks=[cb, keep], enable_checkpointing=True)
    module = Scored()
    fitted.fit(module, loader(), val_loader())
    return fitted, module, cb, folder / "epoch=0.ckpt"


def test_validating_a_checkpoint_uses_its_hyperparameters(checkpoints):
    """A fresh module validated on the first epoch's checkpoint used to keep its initial
    decays (1.14805 instead of 1.15317 here), and the fitted one its last decays
    (1.19402): the checkpoint's weights scored with other hyperparameters."""
    fitted, module, cb, path = checkpoints
    saved = torch.load(path, weights_only=False)
    raw = saved["callbacks"]["HypergradientCallback"]["hopt"]["hparams"]["raw"]["decay"]
    want = penalized(saved["state_dict"], raw)
    assert not torch.equal(raw, module.decay.raw)  # the decays moved after epoch 0
    fresh, late = Scored(), callback()
    got = trainer(callbacks=[late]).validate(fresh, val_loader(), ckpt_path=path, verbose=False)
    assert got[0]["penalized"] == want
    assert torch.equal(fresh.decay.raw, raw)
    assert late.hopt is None and late._loaded is None  # nothing kept for a later fit
    got = fitted.validate(module, val_loader(), ckpt_path=path, verbose=False)
    assert got[0]["penalized"] == want
    assert torch.equal(module.decay.raw, raw) and cb.hopt.hyperparameters.raw["decay"] is (
        module.decay.raw
    )


def test_a_checkpoint_of_other_hyperparameters_is_refused_and_changes_nothing(checkpoints):
    _, _, _, path = checkpoints
    other = hg.Positive(torch.full((5,), 0.3, dtype=DT))
    before = other.raw.clone()
    cb = callback(hparams={"rate": other})
    with pytest.raises(ValueError, match=r"hyperparameters \['decay'\] differ.*\['rate'\]"):
        trainer(callbacks=[cb]).validate(Scored(), val_loader(), ckpt_path=path, verbose=False)
    assert torch.equal(other.raw, before)


class Seen(Scored):
    """Records the decays each validation batch is scored with (sanity check included)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def validation_step(self, batch, batch_idx):
        self.seen.append(tuned_values(self)["decay"].clone())
        super().validation_step(batch, batch_idx)


def test_a_resumed_fit_scores_the_checkpoints_weights_with_its_hyperparameters(checkpoints):
    """Fitting from the last checkpoint of a finished run trains nothing (the callback never
    reaches on_train_start): the module got the checkpoint's weights but kept its initial
    decays. A resumed fit's sanity check scored the checkpoint's weights with the initial
    decays too."""
    last = checkpoints[3].with_name("epoch=2.ckpt")
    saved = torch.load(last, weights_only=False)
    raw = saved["callbacks"]["HypergradientCallback"]["hopt"]["hparams"]["raw"]["decay"]
    assert not torch.equal(raw, Seen().decay.raw)
    done = Seen()
    trainer(max_epochs=3, callbacks=[callback()]).fit(done, loader(), ckpt_path=last)
    assert torch.equal(done.linear.weight, saved["state_dict"]["linear.weight"])
    assert torch.equal(done.decay.raw, raw) and done.seen == []
    resumed = Seen()
    run = trainer(max_epochs=4, callbacks=[callback()], num_sanity_val_steps=1)
    run.fit(resumed, loader(), val_loader(), ckpt_path=last)
    assert torch.equal(resumed.seen[0], torch.exp(raw))  # the sanity check's batch


class Manual(LogReg):
    """Manual optimization with two optimizer steps per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(2):
            opt.zero_grad()
            self.manual_backward(self.training_loss(batch, tuned_values(self)))
            opt.step()


def test_t1t2_refuses_several_optimizer_steps_on_one_batch():
    """T1T2 differentiates the last step from the parameters before it; the callback reads
    them at the start of the batch, before the first of its two steps. Its decays ended
    0.35 (raw) away from the documented loop's after one epoch; now it refuses, naming the
    fix, before any hyper-step changes them. IFT needs no such parameters: it matches the
    documented loop bit for bit."""
    module, cb = Manual(), callback(hg.T1T2(), every_n_steps=2)
    before = module.decay.raw.clone()
    with pytest.raises(ValueError, match=r"T1T2 .* took 2 optimizer steps on one batch.*IFT"):
        trainer(max_epochs=1, callbacks=[cb]).fit(module, loader())
    assert torch.equal(module.decay.raw, before) and cb.hopt.hyper_steps == 0

    method = lambda: hg.IFT(hg.CG(maxiter=5), damping=0.1)  # noqa: E731
    module, cb = Manual(), callback(method(), every_n_steps=2)
    trainer(max_epochs=1, callbacks=[cb]).fit(module, loader())
    ref = Manual()
    hopt = hg.HyperOptimizer(
        ref,
        ref.hyperparameters_to_tune(),
        inner_optimizer=torch.optim.SGD(ref.parameters(), lr=ref.lr),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=lambda m, h, b: m.training_loss(b, h),
        val_loss=lambda m, h, b: m.validation_loss(b, h),
        val_data=VAL,
        val_batch_size=16,
        method=method(),
        inner_steps=2,
    )
    for batch in loader():
        for _ in range(2):
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    assert cb.hopt.hyper_steps == hopt.hyper_steps == 4
    assert torch.equal(module.decay.raw, ref.decay.raw)
    assert torch.equal(module.linear.weight, ref.linear.weight)


class Single(LogReg):
    """Float32 weights (the Trainer's ``precision="64-true"`` converts them)."""

    def __init__(self):
        super().__init__()
        self.linear = self.linear.float()


def test_float32_validation_data_under_64_true_precision_is_the_float64_run():
    """The Trainer converts the module and the training batches to float64; the hyper-step
    evaluated the float32 validation and holdout rows on float64 weights and crashed
    ("mat1 and mat2 must have the same dtype"). Reference: the float64 module on the same
    rows in float64 under the default precision (the same numbers, bit for bit)."""
    single = tuple(t.float() for t in TRAIN), tuple(t.float() for t in VAL)
    double = tuple(tuple(t.double() for t in part) for part in single)

    def run(module, data, precision):
        cb = HypergradientCallback(
            val_data=data[1],
            val_batch_size=16,
            holdout_data=data[1],
            holdout_batch_size=8,
            every_n_steps=3,
            method=hg.IFT(hg.CG(maxiter=5), damping=0.1),
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        )
        rows = torch.utils.data.TensorDataset(*data[0])
        batches = torch.utils.data.DataLoader(rows, batch_size=16)
        trainer(max_steps=6, callbacks=[cb], precision=precision).fit(module, batches)
        return cb.hopt

    got, want = Single(), LogReg()
    a, b = run(got, single, "64-true"), run(want, double, "32-true")
    assert a.hyper_steps == b.hyper_steps == 2
    assert [r.val_loss for r in a.history] == [r.val_loss for r in b.history]
    assert [r.holdout_loss for r in a.history] == [r.holdout_loss for r in b.history]
    assert torch.equal(got.decay.raw, want.decay.raw)
    assert torch.equal(got.linear.weight, want.linear.weight)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"inner_steps": 5}, "sets `inner_steps` itself .*every_n_steps"),
        ({"process_group": None}, "sets `process_group` itself"),
        ({"histroy_size": 5}, "unknown argument `histroy_size`.*'history_size'"),
    ],
)
def test_an_option_it_does_not_pass_on_is_refused_at_construction(option, match):
    """These failed only once training started (``inner_steps=5``: "got multiple values for
    keyword argument"), after the Trainer had set everything up."""
    with pytest.raises(TypeError, match=match):
        HypergradientCallback(val_data=VAL, **option)
    HypergradientCallback(val_data=VAL, history_size=5, seed=1, on_divergence="skip")


class Accumulating(LogReg):
    """Manual optimization with dropout: one optimizer step every two batches, their
    gradients accumulated."""

    def __init__(self):
        super().__init__(dropout=0.5)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.manual_backward(self.training_loss(batch, tuned_values(self)) / 2)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()


def test_t1t2_skips_a_step_accumulated_over_batches_that_drew_as_the_loop_does():
    """The documented loop skips T1T2's hyper-step, with a warning, after a step whose
    gradient was accumulated over forward passes that drew dropout masks (one replayed
    pass cannot reproduce them). Under the Trainer the callback applied it: 2 hyper-steps,
    decays 0.2 (raw) from the loop's. Now the same skips, decays and weights, bit for bit;
    under automatic accumulation too."""
    module, cb = Accumulating(), callback(hg.T1T2(), every_n_steps=2)
    torch.manual_seed(7)
    with pytest.warns(hg.HypergradientWarning, match="accumulated over several"):
        trainer(max_epochs=2, callbacks=[cb]).fit(module, loader())
    ref = Accumulating()
    hopt = hg.HyperOptimizer(
        ref,
        ref.hyperparameters_to_tune(),
        inner_optimizer=torch.optim.SGD(ref.parameters(), lr=ref.lr),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=lambda m, h, b: m.training_loss(b, h),
        val_loss=lambda m, h, b: m.validation_loss(b, h),
        val_data=VAL,
        val_batch_size=16,
        method=hg.T1T2(),
        inner_steps=2,
    )
    torch.manual_seed(7)
    with pytest.warns(hg.HypergradientWarning, match="accumulated over several"):
        for _ in range(2):
            for i, batch in enumerate(loader()):
                (hopt.train_loss(batch) / 2).backward()
                if i % 2 == 1:
                    hopt.step(batch)
                    hopt.zero_grad()
    assert (cb.hopt.hyper_steps, cb.hopt.skipped) == (hopt.hyper_steps, hopt.skipped) == (0, 2)
    assert torch.equal(module.decay.raw, ref.decay.raw)
    assert torch.equal(module.linear.weight, ref.linear.weight)

    module, cb = LogReg(dropout=0.5), callback(hg.T1T2(), every_n_steps=2)
    with pytest.warns(hg.HypergradientWarning, match="accumulated over several"):
        trainer(max_steps=4, callbacks=[cb], accumulate_grad_batches=2).fit(module, loader())
    assert (cb.hopt.hyper_steps, cb.hopt.skipped) == (0, 2)
    assert torch.equal(module.decay.raw, LogReg().decay.raw)


def test_the_divergence_warning_quotes_the_training_losses_under_accumulation():
    """Lightning passes the hook the loss divided by ``accumulate_grad_batches``; the
    warning quoted 5.4e+04 for a training_step loss of 1.08e+05. Reference: the losses
    training_step returned on the batches that stepped (quoted to 3 digits)."""
    returned = []

    class Net(LogReg):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            returned.append(float(loss))
            return loss

    cb = callback(on_divergence="skip")
    with pytest.warns(hg.HypergradientWarning, match="diverging") as got:
        trainer(max_steps=6, callbacks=[cb], accumulate_grad_batches=2).fit(Net(lr=1e3), loader())
    (w,) = [w for w in got if "diverging" in str(w.message)]
    quoted = re.search(r"training losses \[([^\]]*)\]", str(w.message)).group(1).split(", ")
    stepped = returned[1::2]  # the second batch of each step
    assert [float(q) for q in quoted] == [float(f"{v:.3g}") for v in stepped[-len(quoted) :]]


def test_declaring_a_new_tensor_at_each_call_is_refused_before_training():
    """``{"decay": self.decay.value}`` is a new tensor at each call: the callback tuned the
    copy it got (3 hyper-steps moved it, two entries below zero) while training_step,
    asking again, trained with the initial decays throughout."""

    class Copies(LogReg):
        def hyperparameters_to_tune(self):
            return {"decay": self.decay.value}

    module = Copies()
    before = module.linear.weight.clone()
    with pytest.raises(ValueError, match=r"\['decay'\] is a new tensor at each call"):
        trainer(max_steps=9, callbacks=[callback()]).fit(module, loader())
    assert torch.equal(module.linear.weight, before)

    class Detached(LogReg):  # the same storage: the hyper-steps reach training
        def __init__(self):
            super().__init__()
            self.plain = torch.full((5,), 1e-2, dtype=DT)

        def hyperparameters_to_tune(self):
            return {"decay": self.plain.detach()}

    module, cb = Detached(), callback()
    trainer(max_steps=9, callbacks=[cb]).fit(module, loader())
    assert cb.hopt.hyper_steps == 3
    assert torch.equal(module.plain, cb.hopt.hparams["decay"])
    assert not torch.equal(module.plain, torch.full((5,), 1e-2, dtype=DT))
