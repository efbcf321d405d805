"""What can differ between two detectors of the same parameters (their settings, recorded in checkpoints), and
a detector's weights for a dataset with the settings they were trained under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROI_ALIGN_KINDS = ("v2", "torchvision")


@dataclass(frozen=True)
class DetectorSettings:
    """What can differ between two detectors of the same parameters; recorded in their checkpoints."""

    image_mean: tuple[float, ...] = IMAGENET_MEAN  # the transform's normalisation, RGB in [0, 1]
    image_std: tuple[float, ...] = IMAGENET_STD
    stride_in_1x1: bool = False  # MSRA ResNets (Detectron2's): a stage's first block strides in its 1x1 conv
    roi_align: str = "v2"  # "v2": Detectron2's ROIAlignV2; "torchvision": torchvision's own RoIAlign

    def __post_init__(self) -> None:
        if self.roi_align not in ROI_ALIGN_KINDS:
            raise ValueError(f"roi_align must be one of {ROI_ALIGN_KINDS}, got {self.roi_align!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "stride_in_1x1": self.stride_in_1x1,
            "roi_align": self.roi_align,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DetectorSettings:
        if not values:
            return cls()
        return cls(
            image_mean=tuple(float(v) for v in values.get("image_mean", IMAGENET_MEAN)),
            image_std=tuple(float(v) for v in values.get("image_std", IMAGENET_STD)),
            stride_in_1x1=bool(values.get("stride_in_1x1", False)),
            roi_align=str(values.get("roi_align", "v2")),
        )


DEFAULT_SETTINGS = DetectorSettings()


@dataclass
class DetectorWeights:
    """A detector's parameters for the data's categories, and the settings they were trained under."""

    state_dict: dict[str, torch.Tensor]
    settings: DetectorSettings
    source: str  # what the file was: "dkd-tune", "state_dict", "torchvision-coco" or "detectron2"
