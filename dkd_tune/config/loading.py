"""Reading a search file: YAML, `--set` overrides, the schema, then the checks that need more than types; each problem one line naming the file and the key."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dkd_tune.config.overrides import apply_set_override
from dkd_tune.config.schema import (
    DETECTION_METRICS,
    METRICS,
    DataMapping,
    Distribution,
    SearchSpaceFile,
)
from dkd_tune.config.searchers import SEARCHERS, searchers_taking
from dkd_tune.config.tracking_uri import check_tracking_uri
from dkd_tune.core.errors import UserInputError, closest_match, did_you_mean
from dkd_tune.core.losses import LOSS_MODE_NAMES, LOSS_MODES
from dkd_tune.core.recipes import (
    INTEGER_FIELDS,
    RECIPE_FIELDS,
    Recipe,
    recipe_with,
    resolve_recipe,
)


def load_search_space(
    path: str | Path, set_overrides: list[str] | tuple[str, ...] = (), notes: list[str] | None = None
) -> SearchSpaceFile:
    """Read, override and validate a search-space file; every problem is one UserInputError line.

    `notes` receives what the overrides changed beyond their own key (a searched field they fixed).
    """
    path = Path(path)
    raw = read_yaml_mapping(path)
    for assignment in set_overrides:
        note = apply_set_override(raw, assignment)
        if note and notes is not None:
            notes.append(note)
    try:
        space = SearchSpaceFile.model_validate(raw)
    except ValidationError as error:
        raise UserInputError(f"{path}: {describe_validation_error(error, SearchSpaceFile)}") from None
    except UserInputError as error:  # the data-spec check names its key itself
        raise UserInputError(f"{path}: {error}") from None
    check_search_space(space, path)
    return space


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserInputError(f"{path}: file not found; expected a search-space YAML file")
    if not path.is_file():
        raise UserInputError(f"{path}: is not a file; expected a search-space YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        raise UserInputError(f"{path}: cannot be read (permission denied)") from None
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{path}: is not UTF-8 text (byte {error.start}); expected a YAML file"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserInputError(f"{path}: YAML syntax error at {where}{problem}") from None
    if data is None:
        raise UserInputError(
            f"{path}: file is empty; expected a mapping with at least name, data and student"
        )
    if not isinstance(data, dict):
        raise UserInputError(
            f"{path}: top level is a {type(data).__name__}; expected a mapping of keys to values"
        )
    return data


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """The first pydantic error as one line: the dotted key, the value, what was expected.

    An unknown key comes first: a misspelt key also makes the key it was meant to be "missing",
    and the misspelling is what the user has to fix.
    """
    errors = error.errors()
    first = next((item for item in errors if item["type"] == "extra_forbidden"), errors[0])
    loc = [
        part for part in first["loc"] if not (isinstance(part, str) and part in ("function-after[", "dict"))
    ]
    key = _dotted(loc)
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        unknown = str(loc[-1])
        if len(loc) == 1 and model is SearchSpaceFile:
            # A recipe field at the top level is the likeliest slip (`--set epoch=120`, `epochs:`).
            field = closest_match(unknown, [*allowed, *RECIPE_FIELDS])
            if field in RECIPE_FIELDS and field not in allowed:
                return (
                    f"{key}: unknown key {unknown!r}; did you mean {field!r}? (a recipe field: under "
                    f"overrides: in the file, or --set {field}=VALUE)"
                )
        return f"{key}: unknown key{did_you_mean(unknown, allowed)}"
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    message = first["msg"].removeprefix("Value error, ")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{key} = {shown}: {message}"


def _dotted(loc: list[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("str", "DataMapping") or "[" in str(part):
            continue  # pydantic's union-branch labels are not keys
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            if part == "DataMapping":
                current = DataMapping
            continue
        current = _model_in_annotation(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [field.alias or name for name, field in current.model_fields.items()]
    return []


def _model_in_annotation(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(argument)
        if found is not None:
            return found
    return None


def check_search_space(space: SearchSpaceFile, path: Path) -> None:
    """Cross-field and file-system checks; raises one UserInputError line naming the key."""
    from dkd_tune.models import list_models
    from dkd_tune.models.detection import DETECTOR_NAMES

    def fail(key: str, message: str) -> None:
        raise UserInputError(f"{path}: {key}: {message}")

    try:
        data = space.data_spec
    except UserInputError as error:
        raise UserInputError(f"{path}: {error}") from None
    models = list(DETECTOR_NAMES) if data.is_detection else list_models()
    if space.student not in models:
        fail("student", f"unknown model{did_you_mean(space.student, models)}")
    if LOSS_MODES[space.loss].needs_teacher and not space.teachers:
        fail("teachers", f"loss {space.loss!r} needs at least one teacher")
    labels = [teacher.label for teacher in space.teachers]
    for index, teacher in enumerate(space.teachers):
        key = f"teachers[{index}]"
        if labels.count(teacher.label) > 1:
            fail(f"{key}.name", f"label {teacher.label!r} is used by two teachers; give each a distinct name")
        if teacher.model not in models:
            fail(f"{key}.model", f"unknown model{did_you_mean(teacher.model, models)}")
        if teacher.checkpoint is not None and not resolve_path(teacher.checkpoint).is_file():
            missing = resolve_path(teacher.checkpoint)
            hint = ""
            if "cifar_teachers" in missing.parts:
                release = Path(*missing.parts[: missing.parts.index("cifar_teachers")])
                hint = f"; the paper's CIFAR-100 teachers: dkd-tune download-teachers --to {release}"
            fail(f"{key}.checkpoint", f"file {str(missing)!r} not found{hint}")
        if teacher.train is not None:
            try:
                resolve_recipe(teacher.train.recipe, overrides=teacher.train.overrides, source=f"{key}.train")
            except UserInputError as error:
                raise UserInputError(f"{path}: {error}") from None
    check_data_present(data, path)
    check_metric_fits_task(space, data, fail)
    if space.metric.startswith("val_") and not data.validation:
        fail(
            "metric",
            f"{space.metric!r} needs a validation split; set data.validation (images per class held out "
            "of the training split), or use a test_ metric",
        )
    if data.kind.storage == "image-folder":
        for index, teacher in enumerate(space.teachers):
            if teacher.train is not None:
                fail(
                    f"teachers[{index}].train",
                    f"{data.name} teachers are not trained here; give a checkpoint (e.g. torchvision's weights file)",
                )
    check_teacher_checkpoints(space, data, path)

    for teacher in space.teachers or [None]:
        where = f"teachers[{space.teachers.index(teacher)}]" if teacher else "space"
        try:
            base = space.base_recipe(teacher)
        except UserInputError as error:
            raise UserInputError(f"{path}: {error}") from None
        for name, distribution in space.space_for(teacher).items():
            origin = f"{where}.space.{name}" if teacher and name in teacher.space else f"space.{name}"
            check_distribution(name, distribution, base, space.search.algorithm, origin, fail)
            if distribution.kind == "auto":
                check_auto_beta(space, data, origin, fail)
    epochs = space.base_recipe(space.teachers[0] if space.teachers else None).epochs
    max_t = space.scheduler.max_t or epochs
    if space.scheduler.max_t is not None and space.scheduler.max_t > epochs:
        fail("scheduler.max_t", f"{space.scheduler.max_t} is more than the recipe's epochs ({epochs})")
    if space.scheduler.type == "asha" and space.scheduler.grace_period > max_t:
        fail(
            "scheduler.grace_period",
            f"{space.scheduler.grace_period} is more than max_t ({max_t}); expected <= max_t",
        )
    if space.tracking_uri is not None:
        try:
            check_tracking_uri(space.tracking_uri, "tracking_uri")
        except UserInputError as error:
            raise UserInputError(f"{path}: {error}") from None
    try:
        check_storage(space.storage, "storage")
    except UserInputError as error:
        raise UserInputError(f"{path}: {error}") from None
    if space.probe is not None and not resolve_path(space.probe.data_root).is_dir():
        fail("probe.data_root", f"folder {str(resolve_path(space.probe.data_root))!r} not found")


def check_metric_fits_task(space: SearchSpaceFile, data: Any, fail) -> None:
    """Detectors are scored by COCO AP, classifiers by accuracy and loss: the metric must be one of the task's."""
    if data.is_detection and space.metric not in DETECTION_METRICS:
        fail(
            "metric",
            f"{space.metric!r} is a classifier's metric; detection searches use {', '.join(DETECTION_METRICS)}",
        )
    if not data.is_detection and space.metric not in METRICS:
        fail(
            "metric",
            f"{space.metric!r} is a detector's metric (COCO AP); expected one of {', '.join(METRICS)}",
        )


def check_teacher_checkpoints(space: SearchSpaceFile, data: Any, path: Path) -> None:
    """Each teacher file is readable, intact and holds its model with the dataset's class count (categories for detectors)."""
    from dkd_tune.data import dataset_num_classes
    from dkd_tune.models import matching_state_dict

    given = [(index, t) for index, t in enumerate(space.teachers) if t.checkpoint is not None]
    if not given:
        return
    if data.is_detection:
        from dkd_tune.data.splits import coco_categories
        from dkd_tune.models.detection import matching_detector_state_dict

        listed = coco_categories(data)
        categories, ids = tuple(name for _, name in listed), tuple(i for i, _ in listed)
        for index, teacher in given:
            try:
                matching_detector_state_dict(teacher.model, resolve_path(teacher.checkpoint), categories, ids)
            except UserInputError as error:
                raise UserInputError(f"{path}: teachers[{index}].checkpoint: {error}") from None
        return
    try:
        num_classes = dataset_num_classes(data)
    except UserInputError as error:
        raise UserInputError(f"{path}: data: {error}") from None
    for index, teacher in given:
        try:
            matching_state_dict(teacher.model, resolve_path(teacher.checkpoint), num_classes)
        except UserInputError as error:
            raise UserInputError(f"{path}: teachers[{index}].checkpoint: {error}") from None


def check_auto_beta(space: SearchSpaceFile, data: Any, key: str, fail) -> None:
    """`beta: auto` needs DKD (or NCKD) and a shipped calibration for the dataset's family."""
    from dkd_tune.teacher.auto_beta import default_calibration_or_none

    if not LOSS_MODES[space.loss].uses_beta:
        fail(key, f"beta: auto predicts DKD's NCKD weight; loss {space.loss!r} has no beta")
    if default_calibration_or_none(data.family) is None:
        fail(
            key,
            f"beta: auto needs a calibration for the {data.family!r} family and dkd-tune ships none; give beta "
            "values to search (e.g. {loguniform: [0.25, 16]}), or run `dkd-tune validate-beta` to make one",
        )


def check_distribution(
    name: str, distribution: Distribution, base: Recipe, algorithm: str, key: str, fail
) -> None:
    if name == "loss":  # the loss mode itself can be a categorical dimension (the A.4 ablations)
        if distribution.kind not in ("choice", "grid", "fixed"):
            fail(
                key,
                f"the loss mode is categorical; use choice, grid or a fixed value, not {distribution.kind}",
            )
        for value in distribution.extremes():
            if value not in LOSS_MODES:
                fail(key, f"loss {value!r} is not one of {', '.join(LOSS_MODE_NAMES)}")
        return
    searcher = SEARCHERS[algorithm]
    prior_takers = [row.name for row in SEARCHERS.values() if row.takes_priors]
    if distribution.kind == "auto":
        if name != "beta":
            fail(key, f"auto is auto-beta's prior for beta; {name} needs values to search")
        if not searcher.takes_priors:
            fail(key, f"beta: auto is a prior for Optuna's prior-guided sampler; needs search.algorithm "
                      f"{' or '.join(prior_takers)}, not {algorithm!r}")  # fmt: skip
        return
    if distribution.prior is not None and not searcher.takes_priors:
        fail(
            key,
            f"prior: is used by Optuna's prior-guided sampler; needs search.algorithm {' or '.join(prior_takers)}, "
            f"not {algorithm!r}",
        )
    if name not in RECIPE_FIELDS or name == "lr_milestones":
        searchable = [field for field in RECIPE_FIELDS if field != "lr_milestones"] + ["loss"]
        fail(key, f"cannot search{did_you_mean(name, searchable)}")
    if distribution.kind not in searcher.searches:
        takers = " or ".join(repr(name) for name in searchers_taking(distribution.kind))
        fail(
            key,
            f"{distribution.kind} values need search.algorithm {takers}; {algorithm} takes "
            f"{', '.join(searcher.searches)} values",
        )
    if name in INTEGER_FIELDS and distribution.kind in ("uniform", "loguniform"):
        fail(key, f"{name} is an integer; use int: [low, high] or choice")
    for value in distribution.extremes():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(key, f"value {value!r} is not a finite number")
        try:
            recipe_with(base, {name: value}, source=key)
        except UserInputError as error:
            fail(key, str(error).removeprefix(f"{key}: "))


def check_data_present(data: Any, path: Path) -> None:
    """A dataset that will not be downloaded or generated must already be on disk."""
    from dkd_tune.data import dataset_problem

    problem = dataset_problem(data)
    if problem:
        raise UserInputError(f"{path}: data: {problem}")


def check_storage(storage: str | None, source: str) -> None:
    """A local storage path must be a folder or creatable as one (URIs such as s3:// are left to Ray)."""
    if not storage or "://" in storage:
        return
    path = resolve_path(storage)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserInputError(
            f"{source} {storage!r}: {existing} is a file; expected a folder for the searches"
        )


def resolve_path(value: str) -> Path:
    """`~` expanded; a relative path is taken from the current directory, as a shell would."""
    return Path(value).expanduser()
