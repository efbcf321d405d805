"""Model checkpoints: save in the project's format, read ours or mdistiller/CRD's or bare state dicts, load teachers strictly.

Files from the official DKD code (mdistiller, whose CIFAR teachers come from CRD) are dicts
whose "model" entry is the state dict (beside "epoch", "optimizer", "best_acc"); the zoo uses
their parameter names, so they load strictly as they are. Networks trained under DataParallel
prefix every name with "module.", which is removed. Checkpoints saved by PyTorch before 0.4.1
lack the batch norms' `num_batches_tracked` counters, which are then started at 0 (they only
matter to batch norm with momentum=None, which no model here uses).

A file that does not fit the requested model fails with one line that says why: the
architecture it holds (from its metadata, or found by matching its parameter names and shapes
against the registry) or its number of classes, expected vs found.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from dkd_tune.core.checkpoint_file import (
    save_checkpoint,
)
from dkd_tune.core.errors import UserInputError
from dkd_tune.models.classifier import ImageClassifier
from dkd_tune.models.registry import create_model, list_models, model_info
from dkd_tune.models.weights_file import read_model_checkpoint

SOURCE_FORMATS = ("dkd-tune", "mdistiller", "state_dict")
BATCH_COUNTER = "num_batches_tracked"


class CheckpointMismatchError(UserInputError):
    """A readable checkpoint that holds another network than the one asked for."""


class ArchitectureMismatchError(CheckpointMismatchError):
    pass


class ClassCountMismatchError(CheckpointMismatchError):
    pass


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    dataset: str,
    input_size: int,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write `model`'s weights with their metadata in the project's format (atomic, hashed); returns the digest.

    `recipe` and `metrics` are plain dicts of numbers, strings, lists and dicts.
    """
    model_info(arch)  # an unknown architecture fails here, not when the file is read back
    state_dict = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    problem = _mismatch(state_dict, arch)
    if problem is not None:
        raise ValueError(f"save_model: the model is not a {arch}: {problem}")
    found_classes = _class_count(state_dict, arch)
    if found_classes != num_classes:
        raise ValueError(f"save_model: the model has {found_classes} classes, not num_classes={num_classes}")
    payload = {
        "kind": "model",
        "arch": arch,
        "num_classes": int(num_classes),
        "dataset": dataset,
        "input_size": int(input_size),
        "recipe": recipe,
        "metrics": metrics,
        "state_dict": state_dict,
    }
    return save_checkpoint(path, payload)


def load_teacher(
    name: str, path: str | os.PathLike, num_classes: int | None = None, device: str | torch.device = "cpu"
) -> ImageClassifier:
    """Build model `name` with the weights in `path` (strict), in eval mode with gradients off.

    `num_classes=None` takes the class count from the file; a number is checked against it.
    """
    state_dict, found_classes = matching_state_dict(name, path, num_classes)
    model = create_model(name, found_classes)
    expected = model.state_dict()
    for key in expected:
        if key.endswith(BATCH_COUNTER) and key not in state_dict:
            state_dict[key] = torch.zeros_like(expected[key])
    model.load_state_dict(state_dict, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def matching_state_dict(
    name: str, path: str | os.PathLike, num_classes: int | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """The weights in `path` and their class count, if they are a `name` (of `num_classes` classes, when given).

    Raises one line for a file that cannot be read, is corrupted, holds another architecture
    (named when the registry recognises it) or another class count; builds no model.
    """
    model_info(name)
    checkpoint = read_model_checkpoint(path)
    path = checkpoint.path
    if checkpoint.arch is not None and checkpoint.arch != name:
        raise ArchitectureMismatchError(
            f"checkpoint {path} holds a {checkpoint.arch} (recorded in the file) but the model asked for is {name}"
        )
    state_dict = checkpoint.state_dict
    problem = _mismatch(state_dict, name)
    if problem is not None:
        matches = [other for other in list_models() if other != name and _mismatch(state_dict, other) is None]
        if matches:
            raise ArchitectureMismatchError(
                f"checkpoint {path} holds a {' or '.join(matches)} (found by its parameter names and shapes) "
                f"but the model asked for is {name}"
            )
        hint = ""
        if any(key.startswith(("student.", "teacher.")) for key in state_dict):
            hint = "; it looks like a whole mdistiller distiller checkpoint (student.*, teacher.*): use its student_* file"
        raise ArchitectureMismatchError(
            f"checkpoint {path}: its parameters do not match {name}: {problem}{hint}"
        )
    found_classes = _class_count(state_dict, name)
    if num_classes is not None and found_classes != num_classes:
        raise ClassCountMismatchError(
            f"checkpoint {path} ({name}) has {found_classes} classes but {num_classes} were expected"
        )
    return dict(state_dict), found_classes


@functools.cache
def _signature(name: str) -> tuple[dict[str, tuple[int, ...]], str]:
    """Parameter and buffer shapes of model `name` (default class count) and the name of its classifier."""
    with torch.device("meta"):
        model = create_model(name)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}, model.classifier_key()


def _mismatch(state_dict: dict[str, torch.Tensor], name: str) -> str | None:
    """None when `state_dict` has exactly the names and shapes of `name` (any class count), else why not."""
    expected, head_prefix = _signature(name)
    head_keys = {f"{head_prefix}.weight", f"{head_prefix}.bias"}
    missing = [key for key in expected if key not in state_dict and not key.endswith(BATCH_COUNTER)]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = []
    for key, shape in expected.items():
        if key in state_dict:
            found = tuple(state_dict[key].shape)
            # The classifier's first dimension is the class count, checked separately.
            same = found[1:] == shape[1:] and len(found) == len(shape) if key in head_keys else found == shape
            if not same:
                reshaped.append((key, found, shape))
    if not (missing or unexpected or reshaped):
        return None
    examples = [f"missing {key!r}" for key in missing[:2]] + [f"unexpected {key!r}" for key in unexpected[:2]]
    examples += [
        f"{key!r} is {list(found)} in the file, {list(shape)} in {name}" for key, found, shape in reshaped[:2]
    ]
    return (
        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape "
        f"(e.g. {'; '.join(examples[:3])})"
    )


def _class_count(state_dict: dict[str, torch.Tensor], name: str) -> int:
    _, head_prefix = _signature(name)
    return int(state_dict[f"{head_prefix}.weight"].shape[0])
