"""The GPU speed settings compute what the plain fp32 path computes, checked on the CPU (where they exist there).

A GPU is lent only now and then; these keep the fast paths honest on every machine: grouped 1x1
convolutions run dense, and torch.compile in its CUDA-graph mode (on a CPU the same compiled
graphs run without the graphs), each against eager fp32 over a real epoch of `fit`.
"""

from __future__ import annotations

import pytest
import torch

from dkd_tune.engine.acceleration import Acceleration
from dkd_tune.engine.loop import fit
from dkd_tune.models import create_model
from tests.test_train import IDENTITY, datasets, loaders, one_thread, short_recipe  # noqa: F401  (fixtures)

CLASSES = 10


def one_epoch(datasets, model_name: str, acceleration: Acceleration) -> dict:
    recipe = short_recipe(epochs=1, warmup_epochs=0, lr_milestones=[])
    torch.manual_seed(0)
    student = create_model(model_name, num_classes=CLASSES)
    train_loader, test_loader = loaders(datasets, recipe)
    reports = []
    fit(student, train_loader, test_loader, recipe, identity=IDENTITY, loss_mode="ce",
        acceleration=acceleration, reporter=reports.append)  # fmt: skip
    return reports[-1].metrics


def test_grouped_pointwise_run_dense_trains_as_the_grouped_network(datasets):  # noqa: F811
    plain = one_epoch(datasets, "ShuffleV1", Acceleration())
    dense = one_epoch(datasets, "ShuffleV1", Acceleration(dense_grouped_pointwise=True))
    assert dense["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert dense["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_compiled_student_trains_as_the_eager_one(datasets, mode):  # noqa: F811
    plain = one_epoch(datasets, "cnn_8", Acceleration())
    compiled = one_epoch(datasets, "cnn_8", Acceleration(compile=True, compile_mode=mode))
    assert compiled["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)
    assert compiled["test_acc"] == pytest.approx(plain["test_acc"], abs=1.0)
