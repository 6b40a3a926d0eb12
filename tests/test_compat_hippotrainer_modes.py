"""HippoTrainer's ``evaluate`` puts back each submodule's train/eval flag: a fine-tune keeps
frozen BatchNorm layers in eval mode inside a model in train mode, and evaluate used to
restore the mode with ``model.train(was_training)``, which switched those layers to train
mode (their running statistics then moved with every later training batch)."""

from __future__ import annotations

import torch

from hypergradient.compat.hippotrainer import T1T2

DT = torch.float64


def test_evaluate_keeps_a_frozen_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    hyper = {"log_wd": torch.full((6, 4), -3.0, dtype=DT)}

    def criterion(preds, targets):
        wd = 0.5 * (hyper["log_wd"].exp() * model[0].weight ** 2).sum()
        return torch.nn.functional.mse_loss(preds, targets) + wd

    hopt = T1T2(
        hyper,
        hyper_lr=0.1,
        inner_steps=2,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=[(x[:16], y[:16])],
        val_loader=[(x[16:], y[16:])],
        criterion=criterion,
    )
    model.train()
    model[1].eval()  # frozen statistics
    with torch.no_grad():
        train, val = hopt.evaluate()
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    # evaluate's train pass ran in train mode (batch statistics, as HippoTrainer's)
    model.train()
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(x[:16]), y[:16])
    wd = 0.5 * (hyper["log_wd"].exp() * model[0].weight ** 2).sum()
    assert float(train) == float(expected + wd)
