"""Faster R-CNN detectors (torchvision, with FPN) by name: the paper's ResNet and MobileNet-V2 backbones, and two small ones for CPUs.

`frcnn_r18_fpn`, `frcnn_r50_fpn`, `frcnn_r101_fpn` and `frcnn_mv2_fpn` are torchvision's
`FasterRCNN` on an FPN over ResNet-18/50/101 or MobileNet-V2, set as the official DKD detection
code (mdistiller's, on Detectron2) trains them where torchvision allows: frozen batch norms always
(a checkpoint of a trained detector and a freshly built one have the same parameters), the stem
and first stage of a ResNet frozen, every MobileNet-V2 stage trainable and tapped at its end (24,
32, 96 and 320 channels), training images resized to a short side drawn from 640-800 (800 at
test), 1000 proposals kept per image after the RPN's NMS in training, and RoIAlign sampled as
Detectron2's ROIAlignV2 (pixel-aligned, adaptive sampling). Trained from an ImageNet backbone they
start from torchvision's ImageNet weights (downloaded once into torch's cache). `DetectorSettings`,
recorded in every checkpoint, holds what differs between detectors of the same parameters: a
teacher converted from torchvision's COCO weights keeps torchvision's RoIAlign, one converted from
Detectron2's model zoo its input normalisation and MSRA stride placement
(`dkd_tune/models/detector_conversion.py`). `frcnn_tiny` and `frcnn_small` are the same detector
on a few convolutions for 64-pixel images: the generated dataset's demo and tests run them on a CPU.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from dkd_tune.core.errors import UserInputError
from dkd_tune.models import detector_conversion
from dkd_tune.models.checkpoints import ArchitectureMismatchError, ClassCountMismatchError
from dkd_tune.models.detector_settings import DEFAULT_SETTINGS, DetectorSettings, DetectorWeights
from dkd_tune.models.weights_file import read_model_checkpoint


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    backbone: str  # what the FPN sits on
    pretrained_backbone: bool  # whether training starts from torchvision's ImageNet weights
    image_size: str  # the images it is built for


# Detectron2's multi-scale training (mdistiller's Base-Distillation.yaml: MIN_SIZE_TRAIN); 800 at test.
TRAIN_SHORT_SIDES = (640, 672, 704, 736, 768, 800)
MAX_SIDE = 1333
POST_NMS_PROPOSALS_TRAIN = 1000  # Detectron2's RPN.POST_NMS_TOPK_TRAIN for FPN (torchvision: 2000)
MOBILENET_V2_TAPS = {"3": "0", "6": "1", "13": "2", "17": "3"}  # the last block of each stage
MOBILENET_V2_CHANNELS = [24, 32, 96, 320]
BATCH_COUNTER = "num_batches_tracked"  # a batch norm's step counter: no parameter, not compared or stored


def _faster_rcnn(backbone: nn.Module, num_classes: int, settings: DetectorSettings) -> nn.Module:
    """torchvision's FasterRCNN with the official recipe's sizes, proposals and RoIAlign (see the module)."""
    from torchvision.models.detection import FasterRCNN

    pooler_class = AlignedMultiScaleRoIAlign if settings.roi_align == "v2" else MultiScaleRoIAlign
    sampling = 0 if settings.roi_align == "v2" else 2
    return FasterRCNN(
        backbone,
        num_classes=num_classes,
        min_size=TRAIN_SHORT_SIDES,  # one drawn per image in training; the last (800) at test
        max_size=MAX_SIDE,
        image_mean=list(settings.image_mean),
        image_std=list(settings.image_std),
        rpn_post_nms_top_n_train=POST_NMS_PROPOSALS_TRAIN,
        box_roi_pool=pooler_class(["0", "1", "2", "3"], output_size=7, sampling_ratio=sampling),
    )


def _resnet_fpn(
    depth: int, num_classes: int, pretrained_backbone: bool, settings: DetectorSettings
) -> nn.Module:
    from torchvision.models import ResNet18_Weights, ResNet50_Weights, ResNet101_Weights
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc

    weights = {18: ResNet18_Weights, 50: ResNet50_Weights, 101: ResNet101_Weights}[depth].IMAGENET1K_V1
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{depth}",
        weights=weights if pretrained_backbone else None,
        norm_layer=misc.FrozenBatchNorm2d,  # always: trained detectors and loaded ones share their keys
        trainable_layers=3,  # stem and layer1 frozen (Detectron2's FREEZE_AT 2)
    )
    if settings.stride_in_1x1:
        for stage in (backbone.body.layer2, backbone.body.layer3, backbone.body.layer4):
            first = stage[0]
            if hasattr(first, "conv3"):  # a bottleneck (ResNet-50/101): move the stride to the 1x1
                first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
    return _faster_rcnn(backbone, num_classes, settings)


def _mobilenet_v2_fpn(num_classes: int, pretrained_backbone: bool, settings: DetectorSettings) -> nn.Module:
    """MobileNet-V2 as mdistiller's detection backbone: every stage's last block tapped (strides 4-32),
    no 1280-channel conv, frozen batch norms, nothing else frozen (FREEZE_AT 0)."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    features = mobilenet_v2(
        weights=MobileNet_V2_Weights.IMAGENET1K_V1 if pretrained_backbone else None,
        norm_layer=misc.FrozenBatchNorm2d,
    ).features[:18]
    backbone = BackboneWithFPN(
        features, MOBILENET_V2_TAPS, MOBILENET_V2_CHANNELS, 256, extra_blocks=LastLevelMaxPool()
    )
    return _faster_rcnn(backbone, num_classes, settings)


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over FPN levels as Detectron2's ROIAlignV2: pixel-aligned (half-pixel offset) sampling, an
    adaptive number of samples, and its level rule floor(4 + log2(sqrt(area) / 224)), clamped to the levels.

    torchvision's MultiScaleRoIAlign has no `aligned` switch; this computes the same thing with it on.
    """

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int = 0):
        super().__init__(featmap_names, output_size, sampling_ratio)

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        from torchvision.ops import roi_align

        features = [x[name] for name in self.featmap_names]
        # Each level's scale, a power of 2 (as torchvision infers it): its side over the images'.
        scales = [2.0 ** round(math.log2(f.shape[-2] / max(h for h, _ in image_shapes))) for f in features]
        levels_available = [-round(math.log2(scale)) for scale in scales]
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )
        sizes = torch.sqrt((rois[:, 3] - rois[:, 1]).clamp(min=0) * (rois[:, 4] - rois[:, 2]).clamp(min=0))
        levels = torch.floor(4 + torch.log2(sizes / 224 + 1e-8))
        levels = levels.clamp(min=levels_available[0], max=levels_available[-1]) - levels_available[0]
        result = rois.new_zeros((len(rois), features[0].shape[1], *self.output_size), dtype=features[0].dtype)
        for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            chosen = torch.where(levels == level)[0]
            if len(chosen):
                result[chosen] = roi_align(
                    feature, rois[chosen], self.output_size, spatial_scale=scale,
                    sampling_ratio=self.sampling_ratio, aligned=True,
                ).to(result.dtype)  # fmt: skip
        return result


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


# name -> (what it is, builder(num_classes, pretrained_backbone, settings)); the small ones take no settings.
_BUILDERS: dict[str, tuple[DetectorInfo, Callable[[int, bool, DetectorSettings], nn.Module]]] = {
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
        lambda num_classes, _pretrained, _settings: _small_fpn(16, 32, 128, num_classes),
    ),
    "frcnn_small": (
        DetectorInfo("frcnn_small", "4 conv blocks, 32-128 channels", False, "64 px"),
        lambda num_classes, _pretrained, _settings: _small_fpn(32, 64, 256, num_classes),
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


def create_detector(
    name: str,
    num_classes: int,
    *,
    pretrained_backbone: bool = False,
    settings: DetectorSettings = DEFAULT_SETTINGS,
) -> nn.Module:
    """Build detector `name` with `num_classes` logits in its R-CNN head (categories + background).

    `pretrained_backbone` starts the backbone from torchvision's ImageNet weights where the detector
    has them (downloaded into torch's cache when not there yet). The model carries its `settings` as
    `detector_settings` (None for the small CPU detectors, which take none), so checkpoints record them.
    """
    info = detector_info(name)
    try:
        model = _BUILDERS[name][1](num_classes, pretrained_backbone and info.pretrained_backbone, settings)
    except (OSError, RuntimeError) as error:
        if not pretrained_backbone or (
            "download" not in repr(error).lower() and "url" not in repr(error).lower()
        ):
            raise
        raise UserInputError(
            f"{name}: torchvision's ImageNet weights for its {info.backbone} backbone could not be downloaded "
            f"({error}); put them in {os.path.join(torch.hub.get_dir(), 'checkpoints')} or give the teacher a checkpoint"
        ) from None
    model.detector_settings = settings if info.pretrained_backbone else None
    return model


def load_detector(
    name: str,
    path: str | os.PathLike,
    *,
    categories: tuple[str, ...],
    category_ids: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Detector `name` with the weights in `path`, in eval mode without gradients, for data with these
    categories (names in label order; `category_ids` their COCO ids, which map a COCO-trained head)."""
    weights = matching_detector_weights(name, path, categories, category_ids)
    model = create_detector(name, len(categories) + 1, settings=weights.settings)
    counters = {k: v for k, v in model.state_dict().items() if k.endswith(BATCH_COUNTER)}
    model.load_state_dict({**counters, **weights.state_dict}, strict=True)
    return model.eval().requires_grad_(False).to(device)


def matching_detector_state_dict(
    name: str,
    path: str | os.PathLike,
    categories: tuple[str, ...],
    category_ids: tuple[int, ...] | None = None,
) -> dict:
    """The weights in `path` for these categories if they are a `name` (see `matching_detector_weights`)."""
    return matching_detector_weights(name, path, categories, category_ids).state_dict


def matching_detector_weights(
    name: str,
    path: str | os.PathLike,
    categories: tuple[str, ...],
    category_ids: tuple[int, ...] | None = None,
) -> DetectorWeights:
    """The weights in `path` if they are a `name` for these categories; builds no model.

    Reads a dkd-tune checkpoint, a bare torchvision state dict (a COCO-trained one, 91 rows in its
    head, is mapped to the data's categories by COCO id) and a Detectron2 model-zoo pickle (converted,
    `dkd_tune.models.detector_conversion`). One line when the file holds another architecture (named
    when it is a known detector), other categories, or another number of classes.
    """
    detector_info(name)
    if detector_conversion.is_detectron2_file(path):
        converted = detector_conversion.read_detectron2(path, name)
        return detector_conversion.for_categories(converted, name, path, categories, category_ids)
    checkpoint = read_model_checkpoint(path)
    if checkpoint.arch is not None and checkpoint.arch != name:
        raise ArchitectureMismatchError(
            f"checkpoint {checkpoint.path} holds a {checkpoint.arch} (recorded in the file) but the detector asked for is {name}"
        )
    # A batch-norm step counter is no parameter of a frozen batch norm (detectors built before 2026-12-04 had them).
    state_dict = {k: v for k, v in checkpoint.state_dict.items() if not k.endswith(BATCH_COUNTER)}
    if not _same_architecture(state_dict, name):
        others = [
            other for other in DETECTOR_NAMES if other != name and _same_architecture(state_dict, other)
        ]
        holds = f"holds a {' or '.join(others)}" if others else "does not hold a Faster R-CNN of this project"
        raise ArchitectureMismatchError(
            f"checkpoint {checkpoint.path} {holds}, but the detector asked for is {name}"
        )
    found = int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])
    if (
        checkpoint.source_format != "dkd-tune"
        and found == detector_conversion.TORCHVISION_COCO_CLASSES != len(categories) + 1
    ):
        converted = detector_conversion.torchvision_coco(state_dict)
        return detector_conversion.for_categories(converted, name, path, categories, category_ids)
    recorded, recorded_ids = checkpoint.categories, checkpoint.category_ids
    if recorded and tuple(recorded) != tuple(categories):
        if recorded_ids and category_ids:
            converted = detector_conversion.Converted(
                state_dict, DetectorSettings.from_dict(checkpoint.detector), tuple(recorded_ids), "dkd-tune"
            )
            return detector_conversion.for_categories(converted, name, path, categories, category_ids)
        raise UserInputError(
            f"checkpoint {checkpoint.path} was trained on the categories {', '.join(recorded)}; "
            f"the data's are {', '.join(categories)}"
        )
    if found != len(categories) + 1:
        raise ClassCountMismatchError(
            f"checkpoint {checkpoint.path} ({name}) has {found} classes in its R-CNN head but the data have "
            f"{len(categories)} categories and the background ({len(categories) + 1})"
        )
    settings = DetectorSettings.from_dict(checkpoint.detector)
    return DetectorWeights(dict(state_dict), settings, checkpoint.source_format)


@functools.cache
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of `name` (2 classes: the head's first dimensions are not compared)."""
    with torch.device("meta"):
        model = create_detector(name, 2)
    return {
        key: tuple(value.shape)
        for key, value in model.state_dict().items()
        if not key.endswith(BATCH_COUNTER)
    }


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
