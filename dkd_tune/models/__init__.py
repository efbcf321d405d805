"""The model zoo: CIFAR and ImageNet networks behind one registry, and their checkpoints."""

from dkd_tune.models.checkpoints import (
    ArchitectureMismatchError,
    CheckpointMismatchError,
    ClassCountMismatchError,
    load_teacher,
    matching_state_dict,
    save_model,
)
from dkd_tune.models.classifier import ImageClassifier
from dkd_tune.models.registry import (
    FAMILIES,
    ModelInfo,
    count_parameters,
    create_model,
    list_models,
    model_info,
    model_table,
    parameter_count,
)
from dkd_tune.models.weights_file import ModelCheckpoint, read_model_checkpoint

__all__ = [
    "FAMILIES",
    "ArchitectureMismatchError",
    "CheckpointMismatchError",
    "ClassCountMismatchError",
    "ImageClassifier",
    "ModelCheckpoint",
    "ModelInfo",
    "count_parameters",
    "create_model",
    "list_models",
    "load_teacher",
    "matching_state_dict",
    "model_info",
    "model_table",
    "parameter_count",
    "read_model_checkpoint",
    "save_model",
]
