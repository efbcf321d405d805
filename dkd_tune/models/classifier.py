"""The interface every model in the zoo shares: logits from `forward`, pooled features from `forward_features`."""

from __future__ import annotations

import abc

import torch
from torch import nn


class ImageClassifier(nn.Module, metaclass=abc.ABCMeta):
    """An image classifier split into a feature extractor and a linear head (timm's convention).

    `forward(x)` returns logits only, `forward_features(x)` the (N, num_features) vector after
    global pooling and flattening (what a linear probe reads), `forward_head(features)` the logits
    computed from that vector. State-dict keys stay those of the reference code bases, so the
    subclasses keep the reference attribute names even where they read oddly.
    """

    num_features: int

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, num_features) pooled features."""

    @abc.abstractmethod
    def get_classifier(self) -> nn.Linear:
        """The final linear layer: its output size is the number of classes."""

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def num_classes(self) -> int:
        return self.get_classifier().out_features

    def classifier_key(self) -> str:
        """The classifier's state-dict prefix ("fc", "linear", "classifier.0", ...)."""
        head = self.get_classifier()
        return next(name for name, module in self.named_modules() if module is head)


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C). Equal to the reference's fixed-size pooling at the reference input
    size (the last map is then exactly that size) and still correct at other sizes (64x64)."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def init_reference_weights(
    model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False
) -> None:
    """The reference code bases' initialisation: He-normal (fan_out) convolutions with zero biases,
    unit/zero batch norms; linear layers N(0, linear_std) with zero bias when `linear_std` is given,
    else PyTorch's default (with its bias zeroed if `zero_linear_bias`). One pass in module order,
    so the random draws, and hence a seed's weights, are those of the reference."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)
