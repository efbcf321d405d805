"""What data a run uses: the `DataSpec` and its parser for `cifar100:~/data` strings and YAML mappings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dkd_tune.core.errors import UserInputError
from dkd_tune.data.kinds import DATASET_KINDS, DATASET_NAMES, DatasetKind, kinds_where

# Every `augment:` value some dataset takes (each kind's own are in its row).
AUGMENTATIONS = tuple(dict.fromkeys(value for kind in DATASET_KINDS.values() for value in kind.augmentations))
SPEC_KEYS = ("name", "root", "download", "augment", "label_noise", "noise_seed", "generate", "validation")


@dataclass(frozen=True)
class DataSpec:
    """A dataset by name and folder, with the training-set options that change what a model sees."""

    name: str
    root: Path
    download: bool = False
    augment: str = "standard"
    label_noise: float = 0.0
    noise_seed: int = 0
    generate: dict | None = None
    validation: int = 0  # images (per class; detection: in all) held out of the training split (0: none)

    def __hash__(self) -> int:
        generate = None if self.generate is None else tuple(sorted(self.generate.items()))
        return hash(
            (
                self.name, self.root, self.download, self.augment, self.label_noise, self.noise_seed,
                generate, self.validation,
            )
        )  # fmt: skip

    @property
    def kind(self) -> DatasetKind:
        """This dataset's row of the kinds table: storage, task, calibration family, options."""
        return DATASET_KINDS[self.name]

    @property
    def family(self) -> str:
        """Which auto-beta calibration applies ("cifar", "synthetic", "imagenet", "coco")."""
        return self.kind.family

    @property
    def is_detection(self) -> bool:
        return self.kind.is_detection


def short_form_mapping(value: str) -> dict[str, Any] | str:
    """`NAME:PATH` as the mapping it stands for ({name, root}); anything else unchanged (parsing reports it)."""
    name, separator, root = value.partition(":")
    if not separator or not name.strip() or not root.strip():
        return value
    return {"name": name.strip(), "root": root.strip()}


def parse_data_spec(value: str | Mapping[str, Any] | DataSpec, source: str = "--data") -> DataSpec:
    """Parse "NAME:PATH" (e.g. "cifar100:~/data") or a mapping with `name`, `root` and options.

    Every problem raises `UserInputError` naming `source` and the offending key or value.
    """
    if isinstance(value, DataSpec):
        return value
    if isinstance(value, str):
        mapping = short_form_mapping(value)
        if isinstance(mapping, str):
            raise UserInputError(
                f"{source}: {value!r} is not a data spec; expected NAME:PATH with NAME one of "
                f"{', '.join(DATASET_NAMES)}, e.g. 'cifar100:~/data'"
            )
        fields: dict[str, Any] = mapping
    elif isinstance(value, Mapping):
        unknown = sorted(str(key) for key in value if key not in SPEC_KEYS)
        if unknown:
            raise UserInputError(
                f"{source}: unknown key {unknown[0]!r} in the data spec; allowed keys: {', '.join(SPEC_KEYS)}"
            )
        for required in ("name", "root"):
            if required not in value:
                raise UserInputError(f"{source}: the data spec needs the key {required!r}")
        fields = dict(value)
    else:
        raise UserInputError(
            f"{source}: expected a data spec string like 'cifar100:~/data' or a mapping, got {type(value).__name__}"
        )
    return _validated(fields, source)


def _validated(fields: dict[str, Any], source: str) -> DataSpec:
    name = fields["name"]
    if not isinstance(name, str) or name not in DATASET_NAMES:
        raise UserInputError(
            f"{source}: name {name!r} is not a known dataset; expected one of {', '.join(DATASET_NAMES)}"
        )
    root = fields["root"]
    if not isinstance(root, (str, Path)) or not str(root).strip():
        raise UserInputError(f"{source}: root {root!r} is not a folder path")
    kind = DATASET_KINDS[name]
    download = fields.get("download", False)
    if not isinstance(download, bool):
        raise UserInputError(f"{source}: download {download!r} must be true or false")
    if download and not kind.downloads:
        raise UserInputError(
            f"{source}: download: true is available for {' and '.join(kinds_where('downloads'))} only, not {name!r}"
        )
    augment = fields.get("augment", kind.augmentations[0])
    if augment not in AUGMENTATIONS:
        raise UserInputError(f"{source}: augment {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    if augment not in kind.augmentations:
        raise UserInputError(
            f"{source}: augment {augment!r} is not available for {'detection data' if kind.is_detection else name}; "
            f"expected {' or '.join(kind.augmentations)}"
        )
    label_noise = fields.get("label_noise", 0.0)
    if (
        isinstance(label_noise, bool)
        or not isinstance(label_noise, (int, float))
        or not math.isfinite(label_noise)
        or not 0.0 <= label_noise < 1.0
    ):
        raise UserInputError(f"{source}: label_noise {label_noise!r} must be a number in [0, 1)")
    if label_noise and not kind.label_noise:
        raise UserInputError(
            f"{source}: label_noise is available for {' and '.join(kinds_where('label_noise'))} data, not {name}"
        )
    noise_seed = fields.get("noise_seed", 0)
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
        raise UserInputError(f"{source}: noise_seed {noise_seed!r} must be a non-negative integer")
    generate = fields.get("generate")
    if generate is not None:
        generate = _validated_generate(generate, kind, source)
    validation = fields.get("validation", 0)
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 0:
        raise UserInputError(
            f"{source}: validation {validation!r} must be a non-negative integer (images per class held out "
            "of the training split)"
        )
    if validation and not kind.validation_split:
        raise UserInputError(
            f"{source}: validation is available for {', '.join(kinds_where('validation_split'))} data, not {name}"
        )
    return DataSpec(
        name=name,
        root=Path(str(root).strip()).expanduser(),
        download=download,
        augment=augment,
        label_noise=float(label_noise),
        noise_seed=noise_seed,
        generate=generate,
        validation=validation,
    )


def _validated_generate(generate: Any, kind: DatasetKind, source: str) -> dict:
    if not kind.generate_keys:
        raise UserInputError(
            f"{source}: generate is available for {' and '.join(kinds_where('generate_keys'))} data only, "
            f"not {kind.name!r}"
        )
    keys = kind.generate_keys
    if not isinstance(generate, Mapping):
        raise UserInputError(
            f"{source}: generate must be a mapping of generator parameters ({', '.join(keys)})"
        )
    for key, item in generate.items():
        if key not in keys:
            raise UserInputError(f"{source}: unknown key generate.{key}; allowed keys: {', '.join(keys)}")
        if isinstance(item, bool) or not isinstance(item, int):
            raise UserInputError(f"{source}: generate.{key} {item!r} must be an integer")
    return dict(generate)
