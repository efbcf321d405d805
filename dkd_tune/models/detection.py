"""Faster R-CNN detectors (torchvision, with FPN) by name: the paper's ResNet and MobileNet-V2 backbones, and two small ones for CPUs.

`frcnn_r18_fpn`, `frcnn_r50_fpn`, `frcnn_r101_fpn` and `frcnn_mv2_fpn` are torchvision's
`FasterRCNN` with its defaults (those of Detectron2, which A.2 follows: 800-1333 pixel images,
512 sampled proposals per image, a 2x1024 box head) on an FPN over ResNet-18/50/101 or
MobileNet-V2. Trained from an ImageNet backbone, they start from torchvision's ImageNet weights
(downloaded once into torch's cache; frozen batch norms, the stem and first stage frozen, as
torchvision's references do). `frcnn_tiny` and `frcnn_small` are the same detector on a few
convolutions for 64-pixel images: the generated dataset's demo and tests run them on a CPU.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.models.checkpoints import ArchitectureMismatchError, ClassCountMismatchError
from dkd_tune.models.weights_file import read_model_checkpoint


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    backbone: str  # what the FPN sits on
    pretrained_backbone: bool  # whether training starts from torchvision's ImageNet weights
    image_size: str  # the images it is built for


def _resnet_fpn(depth: int, num_classes: int, pretrained_backbone: bool) -> nn.Module:
    from torchvision.models import ResNet18_Weights, ResNet50_Weights, ResNet101_Weights
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc

    weights = {18: ResNet18_Weights, 50: ResNet50_Weights, 101: ResNet101_Weights}[depth].IMAGENET1K_V1
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{depth}",
        weights=weights if pretrained_backbone else None,
        norm_layer=misc.FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d,
        trainable_layers=3 if pretrained_backbone else 5,
    )
    return FasterRCNN(backbone, num_classes=num_classes)


def _mobilenet_v2_fpn(num_classes: int, pretrained_backbone: bool) -> nn.Module:
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops import misc

    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v2",
        weights=MobileNet_V2_Weights.IMAGENET1K_V1 if pretrained_backbone else None,
        fpn=True,
        norm_layer=misc.FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d,
        trainable_layers=3 if pretrained_backbone else 6,
        returned_layers=[1, 2, 3, 5],  # strides 4, 8, 16 and 32, as the ResNet FPNs' C2-C5
    )
    return FasterRCNN(backbone, num_classes=num_classes)


def _small_fpn(width: int, fpn_width: int, head_width: int, num_classes: int) -> nn.Module:
    """A few convolutions (strides 4, 8, 16) under an FPN, sized for 64-pixel images and a CPU."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    def block(inputs: int, outputs: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True),
        )

    body = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(block(3, width // 2), block(width // 2, width)),
            stage2=block(width, 2 * width),
            stage3=block(2 * width, 4 * width),
        )
    )
    backbone = BackboneWithFPN(
        body, {"stem": "0", "stage2": "1", "stage3": "2"}, [width, 2 * width, 4 * width], fpn_width
    )
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    return FasterRCNN(
        backbone,
        num_classes=None,  # given by the box predictor below
        min_size=64,
        max_size=64,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_train=150,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_width * 7 * 7, head_width),
        box_predictor=_predictor(head_width, num_classes),
        box_batch_size_per_image=64,
        box_detections_per_img=20,
        box_score_thresh=0.01,
    )


def _predictor(width: int, num_classes: int) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(width, num_classes)


_BUILDERS: dict[str, tuple[DetectorInfo, Callable[[int, bool], nn.Module]]] = {
    "frcnn_r18_fpn": (
        DetectorInfo("frcnn_r18_fpn", "ResNet-18", True, "COCO (800-1333 px)"),
        functools.partial(_resnet_fpn, 18),
    ),
    "frcnn_r50_fpn": (
        DetectorInfo("frcnn_r50_fpn", "ResNet-50", True, "COCO (800-1333 px)"),
        functools.partial(_resnet_fpn, 50),
    ),
    "frcnn_r101_fpn": (
        DetectorInfo("frcnn_r101_fpn", "ResNet-101", True, "COCO (800-1333 px)"),
        functools.partial(_resnet_fpn, 101),
    ),
    "frcnn_mv2_fpn": (
        DetectorInfo("frcnn_mv2_fpn", "MobileNet-V2", True, "COCO (800-1333 px)"),
        _mobilenet_v2_fpn,
    ),
    "frcnn_tiny": (
        DetectorInfo("frcnn_tiny", "4 conv blocks, 16-64 channels", False, "64 px"),
        lambda num_classes, _pretrained: _small_fpn(16, 32, 128, num_classes),
    ),
    "frcnn_small": (
        DetectorInfo("frcnn_small", "4 conv blocks, 32-128 channels", False, "64 px"),
        lambda num_classes, _pretrained: _small_fpn(32, 64, 256, num_classes),
    ),
}
DETECTOR_NAMES = tuple(_BUILDERS)


def is_detector(name: str) -> bool:
    return name in _BUILDERS


def detector_table() -> list[tuple[DetectorInfo, int]]:
    """Every detector with its learnable parameters at COCO's 80 categories (+ background), built on the meta device."""
    rows = []
    for name, (info, _) in _BUILDERS.items():
        with torch.device("meta"):
            model = create_detector(name, 81)
        rows.append((info, sum(p.numel() for p in model.parameters() if p.requires_grad)))
    return rows


def detector_info(name: str) -> DetectorInfo:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, DETECTOR_NAMES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known detectors: {', '.join(DETECTOR_NAMES)}"
        raise UserInputError(f"unknown detector {name!r}; {hint}")
    return _BUILDERS[name][0]


def create_detector(name: str, num_classes: int, *, pretrained_backbone: bool = False) -> nn.Module:
    """Build detector `name` with `num_classes` logits in its R-CNN head (categories + background).

    `pretrained_backbone` starts the backbone from torchvision's ImageNet weights where the detector
    has them (downloaded into torch's cache when not there yet).
    """
    info = detector_info(name)
    try:
        return _BUILDERS[name][1](num_classes, pretrained_backbone and info.pretrained_backbone)
    except (OSError, RuntimeError) as error:
        if not pretrained_backbone or (
            "download" not in repr(error).lower() and "url" not in repr(error).lower()
        ):
            raise
        raise UserInputError(
            f"{name}: torchvision's ImageNet weights for its {info.backbone} backbone could not be downloaded "
            f"({error}); put them in {os.path.join(torch.hub.get_dir(), 'checkpoints')} or give the teacher a checkpoint"
        ) from None


def load_detector(
    name: str, path: str | os.PathLike, *, categories: tuple[str, ...], device: str | torch.device = "cpu"
) -> nn.Module:
    """Detector `name` with the weights in `path`, in eval mode without gradients, for data with these categories."""
    state_dict = matching_detector_state_dict(name, path, categories)
    model = create_detector(name, len(categories) + 1)
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False).to(device)


def matching_detector_state_dict(name: str, path: str | os.PathLike, categories: tuple[str, ...]) -> dict:
    """The weights in `path` if they are a `name` for these categories; builds no model.

    One line when the file holds another architecture (named when it is a known detector), was
    trained on other categories (when it records them) or has another number of classes.
    """
    detector_info(name)
    checkpoint = read_model_checkpoint(path)
    if checkpoint.arch is not None and checkpoint.arch != name:
        raise ArchitectureMismatchError(
            f"checkpoint {checkpoint.path} holds a {checkpoint.arch} (recorded in the file) but the detector asked for is {name}"
        )
    state_dict = checkpoint.state_dict
    if not _same_architecture(state_dict, name):
        others = [
            other for other in DETECTOR_NAMES if other != name and _same_architecture(state_dict, other)
        ]
        holds = f"holds a {' or '.join(others)}" if others else "does not hold a Faster R-CNN of this project"
        raise ArchitectureMismatchError(
            f"checkpoint {checkpoint.path} {holds}, but the detector asked for is {name}"
        )
    recorded = checkpoint.categories
    if recorded and tuple(recorded) != tuple(categories):
        raise UserInputError(
            f"checkpoint {checkpoint.path} was trained on the categories {', '.join(recorded)}; "
            f"the data's are {', '.join(categories)}"
        )
    found = int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])
    if found != len(categories) + 1:
        raise ClassCountMismatchError(
            f"checkpoint {checkpoint.path} ({name}) has {found} classes in its R-CNN head but the data have "
            f"{len(categories)} categories and the background ({len(categories) + 1})"
        )
    return dict(state_dict)


@functools.cache
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of `name` (2 classes: the head's first dimensions are not compared)."""
    with torch.device("meta"):
        model = create_detector(name, 2)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _same_architecture(state_dict: dict[str, Any], name: str) -> bool:
    expected = _signature(name)
    if set(state_dict) != set(expected):
        return False
    head = "roi_heads.box_predictor."
    return all(
        tuple(state_dict[key].shape)[1:] == shape[1:]
        if key.startswith(head)
        else tuple(state_dict[key].shape) == shape
        for key, shape in expected.items()
    )
