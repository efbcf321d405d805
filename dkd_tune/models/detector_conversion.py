"""Published COCO detectors as this project's detectors: torchvision's COCO weights (a 91-index head) and
Detectron2's model-zoo checkpoints (their pickle format), mapped to a dataset's categories by COCO category id.

torchvision's COCO-trained Faster R-CNN (`fasterrcnn_resnet50_fpn`, COCO_V1) has the parameters of
`frcnn_r50_fpn`; its head has 91 rows, row i for COCO category id i (0 the background, ten unused
ids). torchvision runs those weights with frozen batch norms of eps 0; here the eps (1e-5) is folded
into the stored variances, so the detector computes exactly what torchvision's does, with
torchvision's RoIAlign (`DetectorSettings.roi_align = "torchvision"`).

Detectron2's model-zoo files (`model_final_*.pkl`, the teachers of the official DKD detection code)
are a pickled dict {"model": {name: numpy array}, "__author__": ...}. They are read with an
unpickler that builds only dicts, strings, numbers and numpy arrays (nothing else is importable), and
converted: parameter names mapped (Detectron2's `backbone.bottom_up.res2.0.conv1.norm.weight` is
torchvision's `backbone.body.layer1.0.bn1.weight`, ...), the stem's input channels flipped from BGR to
RGB, the input normalisation recorded (0-255 pixels minus Detectron2's mean, std 1), the MSRA stride
placement recorded (`stride_in_1x1`: a stage's first block strides in its 1x1 conv), and the head
re-laid: Detectron2 puts the background last and has no box deltas for it; this project puts it
first. What stays different from Detectron2 itself: image resizing (torchvision's interpolation and
rounding), anchors (torchvision rounds them to whole pixels), tiny-box filters, and in training its
smooth-L1 box loss. The mapping follows Detectron2's code (`modeling/backbone/resnet.py`, `fpn.py`,
`proposal_generator/rpn.py`, `roi_heads/fast_rcnn.py`) and its own torchvision converter read in
reverse; it was not checked against a downloaded zoo file here (no network), only on files a test
writes in Detectron2's format.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dkd_tune.core.errors import UserInputError
from dkd_tune.models.detector_settings import DetectorSettings, DetectorWeights

TORCHVISION_COCO_CLASSES = 91
TORCHVISION_SETTINGS = DetectorSettings(roi_align="torchvision")
FROZEN_BN_EPS = 1e-5  # torchvision's FrozenBatchNorm2d default; its COCO weights run with 0
DETECTRON2_SETTINGS = DetectorSettings(
    image_mean=(123.675 / 255, 116.28 / 255, 103.53 / 255),  # Detectron2's BGR mean, in RGB order
    image_std=(1 / 255, 1 / 255, 1 / 255),  # std 1 on 0-255 pixels
    stride_in_1x1=True,
    roi_align="v2",
)
DETECTRON2_AUTHOR = "Detectron2 Model Zoo"
# The paper's COCO teachers: Detectron2's model zoo, 3x schedule (box AP 42.0 and 40.2 on val2017).
DETECTRON2_TEACHERS = {
    "frcnn_r101_fpn": "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/model_final_f6e8b1.pkl",
    "frcnn_r50_fpn": "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl",
}
# Detectron2's 80 contiguous classes, as COCO category ids (its builtin COCO metadata, in order).
COCO_THING_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58,
    59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
    89, 90,
)  # fmt: skip
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}
_HEAD = "roi_heads.box_predictor."


@dataclass
class Converted:
    """A detector's parameters with the head rows: background first, then one per `category_ids` (COCO ids)."""

    state_dict: dict[str, torch.Tensor]
    settings: DetectorSettings
    category_ids: tuple[int, ...]
    source: str


def for_categories(
    converted: Converted,
    name: str,
    path: str | os.PathLike,
    categories: tuple[str, ...],
    category_ids: tuple[int, ...] | None,
) -> DetectorWeights:
    """The head's rows of the data's categories (by COCO category id), background first; one line when the
    data give no ids or ask for one the detector was not trained on."""
    if category_ids is None:
        raise UserInputError(
            f"{path}: a COCO-trained {name} is mapped to the data's categories by COCO category id, and "
            "this data gives none"
        )
    rows = [0]
    for category_id, category in zip(category_ids, categories, strict=True):
        if category_id not in converted.category_ids:
            raise UserInputError(
                f"{path}: the data's category {category!r} has COCO category id {category_id}, which this "
                f"{name} ({converted.source}) was not trained on; it knows ids {_id_ranges(converted.category_ids)}"
            )
        rows.append(1 + converted.category_ids.index(category_id))
    state_dict = dict(converted.state_dict)
    index = torch.tensor(rows)
    box_index = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
    for key in ("cls_score.weight", "cls_score.bias"):
        state_dict[_HEAD + key] = state_dict[_HEAD + key][index].clone()
    for key in ("bbox_pred.weight", "bbox_pred.bias"):
        state_dict[_HEAD + key] = state_dict[_HEAD + key][box_index].clone()
    return DetectorWeights(state_dict, converted.settings, converted.source)


def torchvision_coco(state_dict: dict[str, torch.Tensor]) -> Converted:
    """torchvision's COCO-trained weights: row i of the head is COCO id i; batch-norm eps 0 folded in."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    ids = tuple(i for i in range(1, TORCHVISION_COCO_CLASSES) if names[i] != "N/A")
    folded = {
        key: value - FROZEN_BN_EPS if key.endswith("running_var") else value
        for key, value in state_dict.items()
    }
    # Keep only the trained rows: the background and the 80 categories, in id order.
    converted = Converted(
        folded, TORCHVISION_SETTINGS, tuple(range(1, TORCHVISION_COCO_CLASSES)), "torchvision-coco"
    )
    kept = for_categories(converted, "frcnn_r50_fpn", "torchvision", tuple(map(str, ids)), ids)
    return Converted(kept.state_dict, TORCHVISION_SETTINGS, ids, "torchvision-coco")


def is_detectron2_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a pickle (not torch's zip format): how Detectron2's model zoo ships detectors."""
    try:
        with open(Path(path).expanduser(), "rb") as file:
            head = file.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5) and str(path).endswith(".pkl")


def read_detectron2(path: str | os.PathLike, name: str) -> Converted:
    """A Detectron2 model-zoo Faster R-CNN-FPN file as `name` (frcnn_r50_fpn or frcnn_r101_fpn)."""
    path = Path(path).expanduser()
    if name not in DETECTRON2_TEACHERS:
        raise UserInputError(
            f"{path}: a Detectron2 checkpoint converts to {' or '.join(DETECTRON2_TEACHERS)} (Detectron2's "
            f"model zoo has those), not {name}"
        )
    content = _safe_unpickle(path)
    model = content.get("model") if isinstance(content, dict) else None
    if not isinstance(model, dict) or not all(isinstance(v, np.ndarray) for v in model.values()):
        raise UserInputError(
            f"{path}: not a Detectron2 checkpoint (expected a dict with a 'model' dict of arrays)"
        )
    state_dict = {}
    for key, value in model.items():
        if "anchor_generator.cell_anchors" in key or key in ("pixel_mean", "pixel_std"):
            continue
        state_dict[detectron2_key(key, path)] = torch.from_numpy(np.ascontiguousarray(value)).float()
    stem = "backbone.body.conv1.weight"
    if stem not in state_dict:
        raise UserInputError(f"{path}: a Detectron2 checkpoint without a ResNet stem; expected a ResNet-FPN")
    state_dict[stem] = state_dict[stem][:, [2, 1, 0]].clone()  # BGR input channels -> RGB
    cls_weight, cls_bias = state_dict[_HEAD + "cls_score.weight"], state_dict[_HEAD + "cls_score.bias"]
    classes = cls_weight.shape[0] - 1
    if classes != len(COCO_THING_IDS):
        raise UserInputError(
            f"{path}: a Detectron2 head of {classes} classes; expected COCO's {len(COCO_THING_IDS)}"
        )
    order = torch.tensor([classes, *range(classes)])  # background (last in Detectron2) first
    state_dict[_HEAD + "cls_score.weight"] = cls_weight[order].clone()
    state_dict[_HEAD + "cls_score.bias"] = cls_bias[order].clone()
    box_weight, box_bias = state_dict[_HEAD + "bbox_pred.weight"], state_dict[_HEAD + "bbox_pred.bias"]
    state_dict[_HEAD + "bbox_pred.weight"] = torch.cat(
        [box_weight.new_zeros(4, box_weight.shape[1]), box_weight]
    )
    state_dict[_HEAD + "bbox_pred.bias"] = torch.cat([box_bias.new_zeros(4), box_bias])
    return Converted(state_dict, DETECTRON2_SETTINGS, COCO_THING_IDS, "detectron2")


_RULES = [
    (r"^backbone\.bottom_up\.stem\.conv1\.weight$", "backbone.body.conv1.weight"),
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)$", r"backbone.body.bn1.\1"),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight$", None),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$", None),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight$", None),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$", None),
    (r"^backbone\.fpn_lateral(\d)\.(weight|bias)$", None),
    (r"^backbone\.fpn_output(\d)\.(weight|bias)$", None),
    (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_heads\.box_head\.fc1\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_heads\.box_head\.fc2\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_heads.box_predictor.\1.\2"),
]


def detectron2_key(key: str, path: Path | str = "") -> str:
    """The torchvision name of a Detectron2 Faster R-CNN-FPN (ResNet) parameter; one line for an unknown one."""
    for pattern, target in _RULES:
        match = re.match(pattern, key)
        if not match:
            continue
        if target is not None:
            return match.expand(target)
        groups = match.groups()
        if "fpn_lateral" in pattern or "fpn_output" in pattern:
            blocks = "inner_blocks" if "fpn_lateral" in pattern else "layer_blocks"
            return f"backbone.fpn.{blocks}.{int(groups[0]) - 2}.0.{groups[1]}"
        stage, block = int(groups[0]) - 1, groups[1]
        prefix = f"backbone.body.layer{stage}.{block}"
        if "shortcut" in pattern:
            return (
                f"{prefix}.downsample.0.weight" if len(groups) == 2 else f"{prefix}.downsample.1.{groups[2]}"
            )
        conv = groups[2]
        return f"{prefix}.conv{conv}.weight" if len(groups) == 3 else f"{prefix}.bn{conv}.{groups[3]}"
    raise UserInputError(
        f"{path}: Detectron2 parameter {key!r} is not part of a Faster R-CNN-FPN on a ResNet"
    )


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, strings, numbers and numpy arrays; any other global is refused before it is imported."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a Detectron2 checkpoint")
        if module == "collections":
            return OrderedDict
        if module == "_codecs":
            import codecs

            return codecs.encode
        return super().find_class(module.replace("numpy._core", "numpy.core"), name)


def _safe_unpickle(path: Path):
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserInputError(f"{path}: cannot read ({error})") from None
    try:
        return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UserInputError(f"{path}: not a readable Detectron2 checkpoint ({error})") from None


def _id_ranges(ids: tuple[int, ...]) -> str:
    """`1-11, 13-25, ...`: a sorted id list, short."""
    ranges, start, previous = [], None, None
    for value in sorted(ids):
        if start is None:
            start = previous = value
        elif value == previous + 1:
            previous = value
        else:
            ranges.append(f"{start}-{previous}" if start != previous else str(start))
            start = previous = value
    if start is not None:
        ranges.append(f"{start}-{previous}" if start != previous else str(start))
    return ", ".join(ranges)
