"""The paper's recipes (A.2): presets, per-pair values, schedules, overrides and their validation."""

import pytest

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import cifar100, imagenet, resolve_recipe, teacher_cifar100


def test_cifar100_preset_matches_the_paper():
    recipe = cifar100(student="resnet8x4", teacher="resnet32x4")
    assert (recipe.epochs, recipe.batch_size, recipe.lr) == (240, 64, 0.05)
    assert recipe.lr_milestones == (150, 180, 210) and recipe.lr_decay == 0.1
    assert (recipe.weight_decay, recipe.momentum, recipe.ce_weight) == (5e-4, 0.9, 1.0)
    assert (recipe.alpha, recipe.beta, recipe.temperature, recipe.warmup_epochs) == (1.0, 8.0, 4.0, 20)


@pytest.mark.parametrize("student", ["ShuffleV1", "ShuffleV2", "MobileNetV2"])
def test_shufflenet_and_mobilenet_students_use_lr_0_01(student):
    assert cifar100(student=student).lr == 0.01


@pytest.mark.parametrize(
    ("teacher", "beta"),
    [
        ("resnet56", 2.0),
        ("resnet110", 2.0),
        ("wrn_40_2", 6.0),
        ("vgg13", 6.0),
        ("ResNet50", 8.0),
        ("resnet32x4", 8.0),
    ],
)
def test_beta_per_teacher_follows_table_a2(teacher, beta):
    assert cifar100(student="resnet8x4", teacher=teacher).beta == beta


def test_schedule_at_the_epochs_that_matter():
    recipe = cifar100()
    expected_lr = {0: 0.05, 19: 0.05, 20: 0.05, 149: 0.05, 150: 0.005, 180: 0.0005, 210: 0.00005}
    expected_warmup = {0: 1 / 20, 19: 1.0, 20: 1.0, 149: 1.0, 150: 1.0, 180: 1.0, 210: 1.0}
    for epoch, lr in expected_lr.items():
        assert recipe.lr_at(epoch) == pytest.approx(lr, rel=1e-12), epoch
        assert recipe.warmup_factor_at(epoch) == pytest.approx(expected_warmup[epoch]), epoch
    assert recipe.warmup_factor_at(9) == pytest.approx(0.5)


def test_imagenet_and_teacher_presets():
    same_family = imagenet(student="resnet18", teacher="resnet34")
    assert (same_family.epochs, same_family.batch_size, same_family.lr, same_family.weight_decay) == (
        100,
        512,
        0.2,
        1e-4,
    )
    assert (same_family.temperature, same_family.alpha, same_family.beta) == (1.0, 0.5, 0.5)
    assert same_family.lr_at(29) == 0.2 and same_family.lr_at(30) == pytest.approx(0.02)
    assert imagenet(student="MobileNetV1", teacher="resnet50").beta == 2.0
    teacher = teacher_cifar100(student="wrn_40_2")
    assert teacher.epochs == 240 and teacher.lr == 0.05 and teacher.warmup_epochs == 0


def test_overrides_are_typed_and_checked():
    recipe = resolve_recipe("cifar100", overrides={"epochs": "30", "lr_milestones": "[20, 10]", "beta": 3})
    assert recipe.epochs == 30 and recipe.lr_milestones == (10, 20) and recipe.beta == 3.0
    with pytest.raises(UserInputError, match="did you mean 'beta'"):
        resolve_recipe("cifar100", overrides={"betta": 1})
    with pytest.raises(UserInputError, match=r"temperature = 0\.0 is not valid"):
        resolve_recipe("cifar100", overrides={"temperature": 0})
    with pytest.raises(UserInputError, match="warmup_epochs = 50"):
        resolve_recipe("cifar100", overrides={"epochs": 10, "warmup_epochs": 50})
    with pytest.raises(UserInputError, match="expected an integer"):
        resolve_recipe("cifar100", overrides={"epochs": 2.5})
    with pytest.raises(UserInputError, match="unknown recipe preset"):
        resolve_recipe("cifar10")
