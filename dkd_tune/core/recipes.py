"""The paper's training recipes (appendix A.2) as typed presets whose every field can be overridden."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dkd_tune.core.errors import UserInputError

# Students that the paper trains with lr 0.01 instead of 0.05 on CIFAR-100 (A.2).
LOW_LR_STUDENTS = frozenset({"ShuffleV1", "ShuffleV2", "MobileNetV2"})

# Table A.2: beta per teacher for the CIFAR-100 tables (teacher name -> beta).
CIFAR_BETA_BY_TEACHER = {
    "resnet56": 2.0,
    "resnet110": 2.0,
    "wrn_40_2": 6.0,
    "vgg13": 6.0,
    "ResNet50": 8.0,
    "resnet32x4": 8.0,
}
# The official code's default DKD beta, used for a CIFAR teacher that Table A.2 does not list.
CIFAR_DEFAULT_BETA = 8.0

# ImageNet (A.2): beta 0.5 for ResNet-34 -> ResNet-18, 2.0 across families (ResNet-50 -> MobileNet).
IMAGENET_BETA_BY_TEACHER = {"resnet34": 0.5, "resnet50": 2.0}


@dataclass(frozen=True)
class Recipe:
    """Every training hyperparameter of one run. Names are the same in YAML, `--set` and MLflow params.

    Epochs are counted from 0 in the loop; `lr_milestones` are the epochs at whose start the
    learning rate is multiplied by `lr_decay` (150, 180, 210 on CIFAR-100), and the distillation
    term's warm-up factor at epoch e is min((e + 1) / warmup_epochs, 1), as in the official code.
    """

    name: str
    epochs: int
    batch_size: int
    lr: float
    lr_milestones: tuple[int, ...]
    lr_decay: float
    weight_decay: float
    momentum: float
    ce_weight: float
    kd_weight: float
    alpha: float
    beta: float
    temperature: float
    warmup_epochs: int
    seed: int = 0

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during 0-based `epoch` (step decay at each milestone)."""
        decays = sum(epoch >= milestone for milestone in self.lr_milestones)
        return self.lr * self.lr_decay**decays

    def warmup_factor_at(self, epoch: int) -> float:
        """Linear warm-up of the distillation term during 0-based `epoch`."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min((epoch + 1) / self.warmup_epochs, 1.0)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lr_milestones"] = list(self.lr_milestones)
        return values


RECIPE_FIELDS = tuple(field.name for field in dataclasses.fields(Recipe) if field.name != "name")
# What each field means, for `dkd-tune schema` and error messages.
RECIPE_FIELD_MEANINGS = {
    "epochs": "training epochs of a trial (the budget ASHA's rungs count in)",
    "batch_size": "global batch size (split across a trial's DDP workers)",
    "lr": "initial SGD learning rate",
    "lr_milestones": "epochs at whose start the learning rate is multiplied by lr_decay",
    "lr_decay": "factor applied to the learning rate at each milestone",
    "weight_decay": "SGD weight decay",
    "momentum": "SGD momentum",
    "ce_weight": "weight of the cross-entropy term (detection: of the detector's own losses)",
    "kd_weight": "weight of the KD term (loss: kd)",
    "alpha": "weight of TCKD, DKD's target-class term",
    "beta": "weight of NCKD, DKD's non-target-class term (what auto-beta predicts)",
    "temperature": "temperature T that softens both networks' logits in the distillation terms",
    "warmup_epochs": "epochs over which the distillation term's weight rises linearly to 1",
    "seed": "seed of the student's initial weights, the data order and the augmentation",
}
INTEGER_FIELDS = frozenset(field.name for field in dataclasses.fields(Recipe) if field.type == "int")
OVERRIDABLE_FIELDS = RECIPE_FIELDS


def cifar100(student: str | None = None, teacher: str | None = None) -> Recipe:
    """A.2 CIFAR-100: 240 epochs, SGD, batch 64, lr 0.05 (0.01 for ShuffleNet/MobileNet), T 4."""
    return Recipe(
        name="cifar100",
        epochs=240,
        batch_size=64,
        lr=0.01 if student in LOW_LR_STUDENTS else 0.05,
        lr_milestones=(150, 180, 210),
        lr_decay=0.1,
        weight_decay=5e-4,
        momentum=0.9,
        ce_weight=1.0,
        kd_weight=1.0,
        alpha=1.0,
        beta=CIFAR_BETA_BY_TEACHER.get(teacher or "", CIFAR_DEFAULT_BETA),
        temperature=4.0,
        warmup_epochs=20,
    )


def teacher_cifar100(student: str | None = None, teacher: str | None = None) -> Recipe:
    """The CIFAR-100 schedule for training a network (teacher or baseline) with cross-entropy only."""
    return dataclasses.replace(cifar100(student=student), name="teacher-cifar100", warmup_epochs=0)


def imagenet(student: str | None = None, teacher: str | None = None) -> Recipe:
    """A.2 ImageNet: 100 epochs, batch 512, lr 0.2 (x0.1 every 30 epochs), wd 1e-4, T 1, alpha 0.5."""
    return Recipe(
        name="imagenet",
        epochs=100,
        batch_size=512,
        lr=0.2,
        lr_milestones=(30, 60, 90),
        lr_decay=0.1,
        weight_decay=1e-4,
        momentum=0.9,
        ce_weight=1.0,
        kd_weight=1.0,
        alpha=0.5,
        beta=IMAGENET_BETA_BY_TEACHER.get(teacher or "", 2.0),
        temperature=1.0,
        warmup_epochs=1,  # the official ImageNet DKD configs warm up over 1 epoch
    )


def coco_1x(student: str | None = None, teacher: str | None = None) -> Recipe:
    """A.2 MS-COCO as the official DKD code runs it (mdistiller's detection configs on Detectron2): the 1x
    schedule at batch 8, i.e. 180k iterations ~ 12 epochs of train2017, lr 0.01 (a 1000-iteration linear
    warm-up, the detection loop's) divided by 10 at 120k and 160k ~ epochs 8 and 11, wd 1e-4; DKD on the
    R-CNN head with alpha 1, beta 0.25, T 1 and no warm-up of its weight (A.6 gives none, the official code
    applies none). `ce_weight` weighs the detector's own losses (Detectron2's weights: 1).
    """
    return Recipe(
        name="coco-1x",
        epochs=12,
        batch_size=8,
        lr=0.01,
        lr_milestones=(8, 11),
        lr_decay=0.1,
        weight_decay=1e-4,
        momentum=0.9,
        ce_weight=1.0,
        kd_weight=1.0,
        alpha=1.0,
        beta=0.25,
        temperature=1.0,
        warmup_epochs=0,
    )


PRESETS = {
    "cifar100": cifar100,
    "teacher-cifar100": teacher_cifar100,
    "imagenet": imagenet,
    "coco-1x": coco_1x,
}


def resolve_recipe(
    preset: str,
    *,
    student: str | None = None,
    teacher: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "recipe",
) -> Recipe:
    """The preset for this student/teacher pair with `overrides` applied and checked.

    `source` names where the overrides came from (a file and key, or `--set`) for error messages.
    """
    if preset not in PRESETS:
        raise UserInputError(
            f"{source}: unknown recipe preset {preset!r}; expected one of {', '.join(PRESETS)}"
        )
    recipe = PRESETS[preset](student=student, teacher=teacher)
    if not overrides:
        return validate_recipe(recipe, source)
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in OVERRIDABLE_FIELDS:
            close = difflib.get_close_matches(key, OVERRIDABLE_FIELDS, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; expected one of {', '.join(OVERRIDABLE_FIELDS)}"
            )
            raise UserInputError(f"{source}: unknown recipe field {key!r}{hint}")
        changes[key] = _coerce_field(key, value, source)
    return validate_recipe(dataclasses.replace(recipe, **changes), source)


def _coerce_field(key: str, value: Any, source: str) -> Any:
    """Convert a YAML/--set value to the field's type, refusing what does not fit."""
    expected = {field.name: field.type for field in dataclasses.fields(Recipe)}[key]
    try:
        if expected == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if expected == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if expected == "tuple[int, ...]":
            if isinstance(value, str):
                value = [part for part in value.replace("[", "").replace("]", "").split(",") if part.strip()]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            return tuple(sorted(int(item) for item in value))
    except (TypeError, ValueError):
        pass
    else:
        return value
    kinds = {"int": "an integer", "float": "a number", "tuple[int, ...]": "a list of integer epochs"}
    raise UserInputError(f"{source}: {key} = {value!r} is not valid; expected {kinds[expected]}")


def recipe_with(base: Recipe, values: Mapping[str, Any], source: str) -> Recipe:
    """`base` with searched values (recipe fields only, typed as the fields: a sampler may give 4.0 for
    an integer field), checked."""
    changes = {
        name: round(value) if name in INTEGER_FIELDS else float(value)
        for name, value in values.items()
        if name in RECIPE_FIELDS
    }
    return validate_recipe(dataclasses.replace(base, **changes), source=source)


def validate_recipe(recipe: Recipe, source: str = "recipe") -> Recipe:
    """Refuse impossible values with one line naming the field."""
    checks = [
        (recipe.epochs >= 1, "epochs", "an integer >= 1"),
        (recipe.batch_size >= 1, "batch_size", "an integer >= 1"),
        (recipe.lr > 0, "lr", "a number > 0"),
        (0 < recipe.lr_decay <= 1, "lr_decay", "a number in (0, 1]"),
        (recipe.weight_decay >= 0, "weight_decay", "a number >= 0"),
        (0 <= recipe.momentum < 1, "momentum", "a number in [0, 1)"),
        (recipe.ce_weight >= 0, "ce_weight", "a number >= 0"),
        (recipe.kd_weight >= 0, "kd_weight", "a number >= 0"),
        (recipe.alpha >= 0, "alpha", "a number >= 0"),
        (recipe.beta >= 0, "beta", "a number >= 0"),
        (recipe.temperature > 0, "temperature", "a number > 0"),
        (
            0 <= recipe.warmup_epochs <= recipe.epochs,
            "warmup_epochs",
            f"an integer in [0, epochs={recipe.epochs}]",
        ),
        (all(m >= 0 for m in recipe.lr_milestones), "lr_milestones", "epochs >= 0"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise UserInputError(
                f"{source}: {key} = {getattr(recipe, key)!r} is not valid; expected {expected}"
            )
    return recipe
