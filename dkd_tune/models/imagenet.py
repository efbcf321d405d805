"""ImageNet networks of the paper's ImageNet pairs: torchvision's resnet18/34/50 and mobilenet_v2, mdistiller's MobileNetV1.

The torchvision models are torchvision's own classes (same parameter names, so torchvision's
published weights and mdistiller's ImageNet checkpoints load), given the zoo's
`forward_features` / `forward_head` split. Weights are random unless `pretrained` names a local
state-dict file or "torchvision" (torchvision's published ImageNet-1k weights, version 1 as in
the paper's teachers; "torchvision:IMAGENET1K_V2" picks another entry), which torchvision
downloads once into the torch hub cache when there is internet.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import resnet as tv_resnet

from dkd_tune.core.errors import UserInputError
from dkd_tune.models.classifier import ImageClassifier, global_average_pool
from dkd_tune.models.weights_file import read_model_checkpoint

TORCHVISION_WEIGHTS = "torchvision"
PAPER_WEIGHTS_VERSION = "IMAGENET1K_V1"  # the weights the paper's ImageNet teachers are


class TorchvisionResNet(ImageClassifier, tv_resnet.ResNet):
    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000):
        super().__init__(block, layers, num_classes=num_classes)
        self.num_features = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return global_average_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


class TorchvisionMobileNetV2(ImageClassifier, tv_mobilenetv2.MobileNetV2):
    def __init__(self, num_classes: int = 1000):
        super().__init__(num_classes=num_classes)
        self.num_features = self.last_channel

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_average_pool(self.features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)  # dropout, then the linear layer

    def get_classifier(self) -> nn.Linear:
        return self.classifier[1]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# (output channels, stride) of the 13 depthwise-separable layers after the stride-2 stem.
MOBILENET_V1_LAYERS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class MobileNetV1(ImageClassifier):
    """The student of the paper's ResNet50 -> MobileNetV1 pair; names: model.{0..13}.{0,1,3,4}, fc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [_conv_bn_relu(3, 32, 2)]
        in_channels = 32
        for out_channels, stride in MOBILENET_V1_LAYERS:
            layers.append(_depthwise_separable(in_channels, out_channels, stride))
            in_channels = out_channels
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_average_pool(self.model(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def _torchvision_state_dict(name: str, choice: str) -> dict[str, torch.Tensor]:
    """torchvision's published weights for `name`: from the torch hub cache, else downloaded there."""
    version = choice.partition(":")[2] or PAPER_WEIGHTS_VERSION
    try:
        weights = torchvision.models.get_model_weights(name)[version]
    except (ValueError, KeyError):
        raise UserInputError(
            f"pretrained={choice!r}: torchvision has no weights {version!r} for {name}; expected "
            f"'torchvision' or 'torchvision:<one of {', '.join(torchvision.models.get_model_weights(name).__members__)}>'"
        ) from None
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as error:  # no network, proxy, HTTP error, hash mismatch, partial file
        reason = " ".join(str(error).split())[:160]
        raise UserInputError(
            f"could not get torchvision's {version} weights for {name} from {weights.url} ({reason}); "
            f"download that file where there is internet and pass its path as pretrained=PATH"
        ) from None


def _load_pretrained(model: ImageClassifier, name: str, pretrained: str | os.PathLike) -> None:
    """Load ImageNet weights; with another class count, everything but the new classifier is loaded."""
    if isinstance(pretrained, str) and pretrained.split(":")[0] == TORCHVISION_WEIGHTS:
        if isinstance(model, MobileNetV1):
            raise UserInputError(
                f"pretrained={pretrained!r}: torchvision publishes no weights for {name}; pass a local file instead"
            )
        state_dict, source = _torchvision_state_dict(name, pretrained), f"torchvision's {name} weights"
    else:
        state_dict, source = read_model_checkpoint(pretrained).state_dict, str(Path(pretrained).expanduser())
    head_prefix = model.classifier_key()
    head_keys = {f"{head_prefix}.weight", f"{head_prefix}.bias"}
    if state_dict.get(f"{head_prefix}.weight", torch.empty(0)).shape != model.get_classifier().weight.shape:
        state_dict = {key: value for key, value in state_dict.items() if key not in head_keys}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Files saved before PyTorch 0.4.1 have no batch-norm counters; the model's own (0) stay.
    missing = [key for key in missing if key not in head_keys and not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserInputError(
            f"{source} do not fit {name}: {len(missing)} parameters missing, {len(unexpected)} unexpected "
            f"(e.g. {example!r}); expected a state dict of torchvision's {name}"
        )


def _with_weights(model: ImageClassifier, name: str, pretrained: str | os.PathLike | None) -> ImageClassifier:
    if pretrained is not None:
        _load_pretrained(model, name, pretrained)
    return model


def resnet18(num_classes: int = 1000, pretrained: str | os.PathLike | None = None) -> TorchvisionResNet:
    return _with_weights(
        TorchvisionResNet(tv_resnet.BasicBlock, [2, 2, 2, 2], num_classes), "resnet18", pretrained
    )


def resnet34(num_classes: int = 1000, pretrained: str | os.PathLike | None = None) -> TorchvisionResNet:
    return _with_weights(
        TorchvisionResNet(tv_resnet.BasicBlock, [3, 4, 6, 3], num_classes), "resnet34", pretrained
    )


def resnet50(num_classes: int = 1000, pretrained: str | os.PathLike | None = None) -> TorchvisionResNet:
    return _with_weights(
        TorchvisionResNet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes), "resnet50", pretrained
    )


def mobilenet_v2(
    num_classes: int = 1000, pretrained: str | os.PathLike | None = None
) -> TorchvisionMobileNetV2:
    return _with_weights(TorchvisionMobileNetV2(num_classes), "mobilenet_v2", pretrained)


def mobilenet_v1(num_classes: int = 1000, pretrained: str | os.PathLike | None = None) -> MobileNetV1:
    return _with_weights(MobileNetV1(num_classes), "MobileNetV1", pretrained)
