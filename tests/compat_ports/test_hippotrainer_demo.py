# Ported from HippoTrainer 1.0.0, notebooks/demo.ipynb (https://github.com/intsystems/hippotrainer).
# Copyright (c) 2025 Intelligent systems. MIT License; see LICENSE-hippotrainer.txt here.
# Changes: the import lines (hippotrainer -> hypergradient.compat.hippotrainer); the
# documented migration of the criterion (it holds `theta` and computes `theta.exp()` in
# `forward`; the notebook's `lambd = theta.exp()`, computed once, is never tuned by
# HippoTrainer and is refused here: see the last test); the notebook's display code
# (pandas, seaborn, matplotlib plots) and its global `torch.autograd.set_detect_anomaly(True)`
# dropped; fewer epochs (10 -> 1; DRMAD 3 -> 1) so that it runs in seconds; a seed and
# assertions added.
import math

import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

# ---- Dataset
iris = load_iris()
X = iris.data
y = iris.target
feature_names = iris.feature_names
class_names = iris.target_names

X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.2, random_state=42)

X_train_tensor = torch.tensor(X_train, dtype=torch.float32)
y_train_tensor = torch.tensor(y_train, dtype=torch.long)
X_val_tensor = torch.tensor(X_val, dtype=torch.float32)
y_val_tensor = torch.tensor(y_val, dtype=torch.long)

train_dataset = TensorDataset(X_train_tensor, y_train_tensor)
val_dataset = TensorDataset(X_val_tensor, y_val_tensor)


def loaders():
    train_loader = DataLoader(train_dataset, batch_size=4, shuffle=True)
    val_loader = DataLoader(val_dataset, batch_size=4, shuffle=False)
    return train_loader, val_loader


# ---- Define Logistic Regression Model
class LogisticRegressionModel(nn.Module):
    def __init__(self, input_dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x):
        return self.linear(x)


# ---- Define Loss (migrated: holds theta, computes lambd = theta.exp() in forward)
class LogisticRegressionLoss(nn.Module):
    def __init__(self, model, theta):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss()
        self.model = model
        self.theta = theta

    def forward(self, outputs, labels):
        # Compute the cross-entropy loss
        ce_loss = self.cross_entropy(outputs, labels)

        # Compute the L2 regularization term
        l2_reg = 0.0
        for param in self.model.parameters():
            l2_reg += param.clone().square().sum()

        # Combine the cross-entropy loss and the L2 regularization term
        loss = ce_loss + self.theta.exp() * l2_reg
        return loss


# ---- HyperOptimizer
class HyperTrainer:
    def __init__(self, num_epochs, model, criterion, train_loader, hyper_optimizer):
        self.num_epochs = num_epochs
        self.model = model
        self.criterion = criterion
        self.train_loader = train_loader
        self.hyper_optimizer = hyper_optimizer
        self.hyperparams_history = {
            name: [hyperparam.item()]
            for name, hyperparam in self.hyper_optimizer.hyperparams.items()
        }

    def train(self):
        for epoch in range(self.num_epochs):
            self.model.train()
            running_loss = 0.0
            for inputs, labels in self.train_loader:
                outputs = self.model(inputs)
                loss = self.criterion(outputs, labels)
                loss.backward(retain_graph=True)

                # Use the hyper optimizer step method
                self.hyper_optimizer.step(loss)
                if self.hyper_optimizer.step_count % self.hyper_optimizer.inner_steps == 0:
                    for name, hyperparam in self.hyper_optimizer.hyperparams.items():
                        self.hyperparams_history[name].append(hyperparam.item())

                # Zero the gradients using the hyper optimizer
                self.hyper_optimizer.zero_grad()

                running_loss += loss.item()

            print(
                f"Epoch {epoch + 1}/{self.num_epochs}, "
                f"Training Loss: {running_loss / len(self.train_loader)}"
            )


# ---- The four usage cells (T1-T2, Neumann, DrMAD ("MF DOOM"), HOAG), reduced
CELLS = {
    "T1T2": (T1T2, 1, {"hyper_lr": 1e-3}),
    "Neumann": (Neumann, 1, {"hyper_lr": 1e-3, "inner_steps": 5}),
    "DRMAD": (DRMAD, 1, {"hyper_lr": 0.01, "weight_decay": 0.0001, "T": 3}),
    "HOAG": (HOAG, 1, {"hyper_lr": 1e-3, "inner_steps": 5}),
}


def run_cell(name):
    torch.manual_seed(0)
    cls, num_epochs, kwargs = CELLS[name]
    train_loader, val_loader = loaders()
    input_dim = len(feature_names)
    num_classes = len(class_names)
    model = LogisticRegressionModel(input_dim, num_classes)
    theta = torch.tensor([0.0], requires_grad=True)

    # Initialize the custom loss function
    criterion = LogisticRegressionLoss(model, theta)

    # Initialize the optimizer
    optimizer = optim.SGD(model.parameters(), lr=0.01)

    # Initialize the hyper optimizer
    hyper_optimizer = cls(
        hyperparams={"theta": theta},
        model=model,
        optimizer=optimizer,
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=criterion,
        **kwargs,
    )

    # Initialize the trainer
    trainer = HyperTrainer(num_epochs, model, criterion, train_loader, hyper_optimizer)

    # Train the model
    trainer.train()

    # Evaluate the model
    _, final_val_loss = hyper_optimizer.evaluate()
    print(f"Final Validation Loss: {final_val_loss.item():.4f}")
    return trainer, hyper_optimizer, final_val_loss


def criterion_lambd(hyper_optimizer):
    return hyper_optimizer.criterion.theta.exp()


@pytest.mark.parametrize("name", list(CELLS))
def test_demo_cell_tunes_theta(name):
    trainer, hyper_optimizer, final_val_loss = run_cell(name)
    history = trainer.hyperparams_history["theta"]
    cls, num_epochs, kwargs = CELLS[name]
    steps = num_epochs * len(trainer.train_loader)
    assert len(history) == 1 + steps // kwargs.get("inner_steps", 1)
    assert hyper_optimizer.step_count == steps
    # theta, and with it the criterion's lambd = exp(theta), moves at every hyper-step
    # (HippoTrainer's lambd never moved). The criterion scores validation batches with the
    # penalty too, so d_theta g = lambd * ||w||^2 > 0 pushes theta down; the implicit term
    # pushes it up. T1T2, Neumann(num_terms=1) and DrMAD over 3 steps approximate H^{-1} by
    # O(lr) = O(0.01), so the direct term wins; HOAG solves H x = grad g, and at these
    # weights (far from the inner optimum, where H ~ 2 lambd I) the implicit term wins.
    sign = 1.0 if name == "HOAG" else -1.0
    moves = [sign * (b - a) for a, b in zip(history, history[1:])]
    assert all(m > 1e-5 for m in moves), history
    assert float(hyper_optimizer.hyperparams["theta"]) == history[-1]
    assert float(criterion_lambd(hyper_optimizer)) == pytest.approx(math.exp(history[-1]))
    assert torch.isfinite(final_val_loss)
    assert final_val_loss.requires_grad  # evaluate() is differentiable, as HippoTrainer's


def test_notebook_pattern_is_refused_with_the_fix():
    """The notebook as written: `lambd = theta.exp()` once, held by the criterion."""

    class NotebookLoss(nn.Module):  # the notebook's LogisticRegressionLoss, unmigrated
        def __init__(self, model, lambd):
            super().__init__()
            self.cross_entropy = nn.CrossEntropyLoss()
            self.model = model
            self.lambd = lambd

        def forward(self, outputs, labels):
            l2_reg = sum(p.clone().square().sum() for p in self.model.parameters())
            return self.cross_entropy(outputs, labels) + self.lambd * l2_reg

    train_loader, val_loader = loaders()
    model = LogisticRegressionModel(len(feature_names), len(class_names))
    theta = torch.tensor([0.0], requires_grad=True)
    lambd = theta.exp()
    criterion = NotebookLoss(model, lambd)
    optimizer = optim.SGD(model.parameters(), lr=0.01)
    for cls in (T1T2, Neumann, DRMAD, HOAG):
        with pytest.raises(ValueError) as info:
            cls(
                hyperparams={"theta": theta},
                hyper_lr=1e-3,
                model=model,
                optimizer=optimizer,
                train_loader=train_loader,
                val_loader=val_loader,
                criterion=criterion,
            )
        message = str(info.value)
        assert "criterion.lambd" in message and "hyperparams['theta']" in message
        assert "inside the criterion's forward" in message and "theta.exp()" in message
    assert theta.requires_grad  # refused before anything was changed


def test_hippotrainers_own_test_fixture_is_refused_with_the_fix():
    """HippoTrainer's tests/test_utils.py fixture, unmigrated (`lambd = theta.exp()`)."""
    from hippotrainer_utils import setup_iris_data, setup_model_and_optimizer_original

    train_loader, val_loader = setup_iris_data()
    model, theta, lambd, criterion, optimizer = setup_model_and_optimizer_original(
        train_loader, val_loader
    )
    with pytest.raises(ValueError, match="criterion.lambd was computed once") as info:
        T1T2({"theta": theta}, 1e-3, 1, model, optimizer, train_loader, val_loader, criterion)
    assert "inside the criterion's forward" in str(info.value)
