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


def one_epoch(splits, model_name: str, acceleration: Acceleration, lr: float = 0.05, *, trained=None) -> dict:
    recipe = short_recipe(epochs=1, warmup_epochs=0, lr_milestones=[], lr=lr)
    torch.manual_seed(0)
    student = create_model(model_name, num_classes=CLASSES)
    train_loader, test_loader = loaders(splits, recipe)
    reports = []
    fit(student, train_loader, test_loader, recipe, identity=IDENTITY, loss_mode="ce",
        acceleration=acceleration, reporter=reports.append)  # fmt: skip
    if trained is not None:
        trained.append(student)
    return reports[-1].metrics


def test_grouped_pointwise_run_dense_trains_as_the_grouped_network(datasets):  # noqa: F811
    from dkd_tune.models.grouped_pointwise import BlockDiagonalPointwise

    # The mathematics is the same (tests/test_grouped_pointwise.py, float64). In float32 the two forms
    # round differently, and ShuffleV1's gradients at initialisation are ill-conditioned: against a
    # float64 reference, some grouped 1x1 weights' gradients are off by 1% (grouped kernel) to 8%
    # (dense GEMM) of their largest entry, measured on the CPU. So an epoch of float32 training agrees
    # to about a percent, not to rounding; a wrong block layout would differ from the first batch on.
    trained = []
    plain = one_epoch(datasets, "ShuffleV1", Acceleration(), lr=0.005)
    dense = one_epoch(
        datasets, "ShuffleV1", Acceleration(dense_grouped_pointwise=True), lr=0.005, trained=trained
    )
    assert (
        sum(isinstance(m, BlockDiagonalPointwise) for m in trained[0].modules()) > 0
    )  # fit ran the dense form
    assert dense["train_loss"] == pytest.approx(plain["train_loss"], rel=0.03)
    assert dense["test_loss"] == pytest.approx(plain["test_loss"], rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_compiled_student_trains_as_the_eager_one(datasets, mode):  # noqa: F811
    plain = one_epoch(datasets, "cnn_8", Acceleration())
    compiled = one_epoch(datasets, "cnn_8", Acceleration(compile=True, compile_mode=mode))
    assert compiled["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)
    assert compiled["test_acc"] == pytest.approx(plain["test_acc"], abs=1.0)
