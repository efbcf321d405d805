"""The model registry: one name per network, its family, default input size and class count, and its builder.

CIFAR names are CRD/mdistiller's (case-sensitive: `resnet32x4`, `wrn_40_2`, `ShuffleV1`,
`ResNet18`), ImageNet names torchvision's (`resnet18`, `mobilenet_v2`) plus mdistiller's
`MobileNetV1`, so users' configs and checkpoints carry over unchanged.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.models import (
    imagenet,
    mlp,
    mobilenetv2,
    resnet_cifar,
    resnet_cifar_large,
    shufflenetv1,
    shufflenetv2,
    small_cnn,
    vgg,
    wrn,
)
from dkd_tune.models.classifier import ImageClassifier

# A model's family is its input size and default class count (not a dataset, nor an auto-beta family).
CIFAR_MODELS, IMAGENET_MODELS = "cifar", "imagenet"
FAMILIES = {
    CIFAR_MODELS: (32, 100),
    IMAGENET_MODELS: (224, 1000),
}  # family -> (input size, number of classes)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a model besides its builder."""

    name: str
    family: str  # "cifar" (32x32 inputs, also run at 64x64 for Tiny-ImageNet) or "imagenet"
    input_size: int
    default_num_classes: int


_CIFAR_BUILDERS: dict[str, Callable[..., ImageClassifier]] = {
    "resnet8": resnet_cifar.resnet8,
    "resnet14": resnet_cifar.resnet14,
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet44": resnet_cifar.resnet44,
    "resnet56": resnet_cifar.resnet56,
    "resnet110": resnet_cifar.resnet110,
    "resnet8x4": resnet_cifar.resnet8x4,
    "resnet32x4": resnet_cifar.resnet32x4,
    "ResNet18": resnet_cifar_large.resnet18,
    "ResNet50": resnet_cifar_large.resnet50,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "MobileNetV2": mobilenetv2.mobilenetv2_half,
    "ShuffleV1": shufflenetv1.shufflenet_v1,
    "ShuffleV2": shufflenetv2.shufflenet_v2,
    "mlp_32": mlp.mlp_32,
    "mlp_256": mlp.mlp_256,
    "mlp_512x2": mlp.mlp_512x2,
    "cnn_8": small_cnn.cnn_8,
}

_IMAGENET_BUILDERS: dict[str, Callable[..., ImageClassifier]] = {
    "resnet18": imagenet.resnet18,
    "resnet34": imagenet.resnet34,
    "resnet50": imagenet.resnet50,
    "mobilenet_v2": imagenet.mobilenet_v2,
    "MobileNetV1": imagenet.mobilenet_v1,
}

_BUILDERS = {**_CIFAR_BUILDERS, **_IMAGENET_BUILDERS}
_INFO = {
    name: ModelInfo(name, family, *FAMILIES[family])
    for family, builders in (("cifar", _CIFAR_BUILDERS), ("imagenet", _IMAGENET_BUILDERS))
    for name in builders
}


def list_models(family: str | None = None) -> list[str]:
    """Registered names in registration order (CIFAR first), optionally of one family."""
    if family is not None and family not in FAMILIES:
        raise UserInputError(f"unknown model family {family!r}; expected one of: {', '.join(FAMILIES)}")
    return [name for name, info in _INFO.items() if family is None or info.family == family]


def model_info(name: str) -> ModelInfo:
    if name not in _INFO:
        raise UserInputError(f"unknown model {name!r}; {_suggestion(name)}")
    return _INFO[name]


def _suggestion(name: str) -> str:
    # Match case-insensitively ("resnet3x4", "mobilenetv2") and answer with the exact spellings.
    by_lower: dict[str, list[str]] = {}
    for known in _INFO:
        by_lower.setdefault(known.lower(), []).append(known)
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=3, cutoff=0.6)
    if close:
        return "did you mean: " + ", ".join(known for lower in close for known in by_lower[lower]) + "?"
    return "known models: " + ", ".join(_INFO) + " (see 'dkd-tune models')"


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> ImageClassifier:
    """Build a registered model; `num_classes=None` takes the family's default (CIFAR 100, ImageNet 1000).

    ImageNet models take `pretrained=` (a local state-dict path, or "torchvision").
    """
    info = model_info(name)
    if num_classes is None:
        num_classes = info.default_num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserInputError(f"num_classes for {name} must be a positive integer, not {num_classes!r}")
    builder = _BUILDERS[name]
    accepted = set(inspect.signature(builder).parameters) - {"num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        takes = f"it takes: {', '.join(sorted(accepted))}" if accepted else "it takes only num_classes"
        raise UserInputError(f"model {name!r} has no option {unknown[0]!r}; {takes}")
    return builder(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (buffers such as batch-norm statistics are not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


def parameter_count(name: str, num_classes: int | None = None) -> int:
    """`count_parameters` of a registered model, built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes))


def model_table(family: str | None = None) -> list[tuple[ModelInfo, int]]:
    """Every registered model (of one family) with its parameter count at the family's class count."""
    return [(model_info(name), parameter_count(name)) for name in list_models(family)]
