# Ported from HippoTrainer 1.0.0, tests/test_utils.py (https://github.com/intsystems/hippotrainer).
# Copyright (c) 2025 Intelligent systems. MIT License; see LICENSE-hippotrainer.txt here.
# Changes: the documented migration of the fixture (docs/migration-hippotrainer.md): the
# criterion holds `theta` and computes `theta.exp()` in `forward`, instead of holding a
# `lambd = theta.exp()` computed once (which HippoTrainer never updates and this package
# refuses). The original fixture is kept as `setup_model_and_optimizer_original`.
# `super().__init__()` spelling and formatting by ruff.
import torch
import torch.nn as nn
import torch.optim as optim
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


def setup_iris_data():
    iris = load_iris()
    X = iris.data
    y = iris.target
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.2, random_state=42)

    train_loader = DataLoader(
        TensorDataset(
            torch.tensor(X_train, dtype=torch.float32), torch.tensor(y_train, dtype=torch.long)
        ),
        batch_size=4,
        shuffle=True,
    )
    val_loader = DataLoader(
        TensorDataset(
            torch.tensor(X_val, dtype=torch.float32), torch.tensor(y_val, dtype=torch.long)
        ),
        batch_size=4,
        shuffle=False,
    )
    return train_loader, val_loader


class LogisticRegressionModel(nn.Module):
    def __init__(self, input_dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x):
        return self.linear(x)


class LogisticRegressionLoss(nn.Module):
    """Migrated: holds the hyperparameter `theta` and computes lambd = theta.exp() here."""

    def __init__(self, model, theta):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss()
        self.model = model
        self.theta = theta

    def forward(self, outputs, labels):
        ce_loss = self.cross_entropy(outputs, labels)
        l2_reg = sum(param.clone().square().sum() for param in self.model.parameters())
        lambd = self.theta.exp()
        loss = ce_loss + lambd * l2_reg
        return loss


def setup_model_and_optimizer(train_loader, val_loader):
    model = LogisticRegressionModel(4, 3)
    theta = torch.tensor([0.0], requires_grad=True)
    criterion = LogisticRegressionLoss(model, theta)
    lambd = None  # computed by the criterion at every call (kept for the 5-tuple)
    optimizer = optim.SGD(model.parameters(), lr=0.01)
    return model, theta, lambd, criterion, optimizer


class OriginalLogisticRegressionLoss(nn.Module):
    """HippoTrainer's original criterion: it holds `lambd`, computed once from `theta`."""

    def __init__(self, model, lambd):
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss()
        self.model = model
        self.lambd = lambd

    def forward(self, outputs, labels):
        ce_loss = self.cross_entropy(outputs, labels)
        l2_reg = sum(param.clone().square().sum() for param in self.model.parameters())
        loss = ce_loss + self.lambd * l2_reg
        return loss


def setup_model_and_optimizer_original(train_loader, val_loader):
    model = LogisticRegressionModel(4, 3)
    theta = torch.tensor([0.0], requires_grad=True)
    lambd = theta.exp()
    criterion = OriginalLogisticRegressionLoss(model, lambd)
    optimizer = optim.SGD(model.parameters(), lr=0.01)
    return model, theta, lambd, criterion, optimizer
