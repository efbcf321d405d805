"""Reading a weights file of any supported kind: a dkd-tune checkpoint, an mdistiller/CRD checkpoint or a bare state dict."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkd_tune.core.checkpoint_file import (
    CorruptCheckpointError,
    is_project_checkpoint,
    read_checkpoint_file,
    verified_payload,
)
from dkd_tune.core.errors import UserInputError

DATA_PARALLEL_PREFIX = "module."


@dataclass
class ModelCheckpoint:
    """What a checkpoint file holds. Foreign files (mdistiller, bare state dicts) carry no metadata: None."""

    arch: str | None
    num_classes: int | None
    dataset: str | None
    input_size: int | None
    recipe: dict[str, Any] | None
    metrics: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    source_format: str  # one of SOURCE_FORMATS
    path: Path
    mean: tuple[float, ...] | None = None  # input normalisation the network was trained with, when recorded
    std: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None  # a detector's category names, in label order
    category_ids: tuple[int, ...] | None = None  # ... and their COCO category ids, when recorded
    detector: dict[str, Any] | None = None  # a detector's settings (DetectorSettings.to_dict), when recorded


def read_model_checkpoint(path: str | os.PathLike) -> ModelCheckpoint:
    """Read a dkd-tune model or training checkpoint, an mdistiller/CRD checkpoint or a bare state dict."""
    path = Path(path).expanduser()
    content = read_checkpoint_file(path)
    metadata: dict[str, Any] = {}
    if is_project_checkpoint(content):
        payload = verified_payload(path, content)
        kind = payload.get("kind")
        if kind == "model":
            state_dict = payload.get("state_dict")
        elif kind == "training":
            state_dict = payload.get("model")
        else:
            raise UserInputError(
                f"{path}: a dkd-tune checkpoint of kind {kind!r}; expected a model or training checkpoint"
            )
        metadata = {
            key: payload.get(key)
            for key in (
                "arch",
                "num_classes",
                "dataset",
                "input_size",
                "mean",
                "std",
                "categories",
                "category_ids",
                "detector",
            )
        }
        metadata.update(recipe=payload.get("recipe"), metrics=payload.get("metrics"))
        source_format = "dkd-tune"
    elif isinstance(content, dict) and isinstance(content.get("model"), dict):
        state_dict, source_format = content["model"], "mdistiller"
    elif isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        state_dict, source_format = content, "state_dict"
    else:
        found = (
            f"a dict with keys {', '.join(map(repr, list(content)[:6]))}"
            if isinstance(content, dict)
            else f"a {type(content).__name__}"
        )
        raise UserInputError(
            f"{path}: not a model checkpoint (found {found}); expected a dkd-tune checkpoint, "
            "an mdistiller/CRD checkpoint (a dict with a 'model' state dict) or a bare state dict"
        )
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise CorruptCheckpointError(f"{path}: its state dict is not a mapping of names to tensors")
    if state_dict and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key[len(DATA_PARALLEL_PREFIX) :]: value for key, value in state_dict.items()}
    return ModelCheckpoint(
        arch=metadata.get("arch"),
        num_classes=metadata.get("num_classes"),
        dataset=metadata.get("dataset"),
        input_size=metadata.get("input_size"),
        recipe=metadata.get("recipe"),
        metrics=metadata.get("metrics"),
        state_dict=dict(state_dict),
        source_format=source_format,
        path=path,
        mean=tuple(metadata["mean"]) if metadata.get("mean") else None,
        std=tuple(metadata["std"]) if metadata.get("std") else None,
        categories=tuple(metadata["categories"]) if metadata.get("categories") else None,
        category_ids=tuple(int(i) for i in metadata["category_ids"])
        if metadata.get("category_ids")
        else None,
        detector=dict(metadata["detector"]) if isinstance(metadata.get("detector"), dict) else None,
    )
