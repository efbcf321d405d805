"""The search-space YAML schema: the one place that turns a file (plus `--set` overrides) into typed objects.

Everything is checked here, before Ray, a GPU or a tracking store is touched: syntax, unknown
keys (with the closest valid key), types, impossible values, unknown models, missing
checkpoints and datasets. Each failure is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dkd_tune.errors import UserInputError
from dkd_tune.recipes import PRESETS, RECIPE_FIELDS, Recipe, resolve_recipe, validate_recipe

LOSS_MODES = ("ce", "kd", "dkd", "tckd", "nckd")
# The URI schemes MLflow's tracking store registry knows ('' is a local folder), plus plugins' schemes.
MLFLOW_SCHEMES = (
    "",
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)
METRICS = (
    "test_acc", "best_test_acc", "test_acc_top5", "test_loss", "train_loss", "train_acc", "val_acc", "val_loss",
)  # fmt: skip
INTEGER_FIELDS = frozenset({"epochs", "batch_size", "warmup_epochs", "seed"})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Distribution(StrictModel):
    """How one hyperparameter is searched: exactly one of the keys below (a bare value means `fixed`)."""

    uniform: tuple[float, float] | None = Field(None, description="Uniform float in [low, high].")
    loguniform: tuple[float, float] | None = Field(
        None, description="Log-uniform float in [low, high], low > 0."
    )
    int_range: tuple[int, int] | None = Field(None, alias="int", description="Integer in [low, high].")
    choice: list[Any] | None = Field(None, description="One of these values (categorical).")
    grid: list[Any] | None = Field(None, description="Every one of these values (algorithm: grid or random).")
    fixed: Any = Field(None, description="This value, not searched.")
    auto: bool | None = Field(
        None,
        description="beta only (`beta: auto`): auto-beta's prediction from the teacher's gap is the search's "
        "prior: the first trials at its beta and window ends, then TPE over the calibrated range.",
    )

    @model_validator(mode="before")
    @classmethod
    def bare_value_is_fixed(cls, value: Any) -> Any:
        if value == "auto":
            return {"auto": True}
        return value if isinstance(value, dict) else {"fixed": value}

    @model_validator(mode="after")
    def exactly_one_kind(self) -> Distribution:
        given = [
            name
            for name in ("uniform", "loguniform", "int_range", "choice", "grid", "fixed", "auto")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of uniform, loguniform, int, choice, grid, fixed (or beta: auto)"
            )
        if self.auto is False:
            raise ValueError("auto: false is not a distribution; give the values to search instead")
        low_high = self.uniform or self.loguniform or self.int_range
        if low_high is not None and not low_high[0] <= low_high[1]:
            raise ValueError(f"low must be <= high, got [{low_high[0]}, {low_high[1]}]")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        if (self.choice is not None and not self.choice) or (self.grid is not None and not self.grid):
            raise ValueError("needs at least one value")
        return self

    @property
    def kind(self) -> str:
        for name in ("uniform", "loguniform", "int_range", "choice", "grid", "fixed", "auto"):
            if getattr(self, name) is not None:
                return "int" if name == "int_range" else name
        raise AssertionError("validated to have one kind")

    def extremes(self) -> list[Any]:
        """The values that bound what this distribution can produce (checked against the recipe)."""
        if self.fixed is not None:
            return [self.fixed]
        return list(self.uniform or self.loguniform or self.int_range or self.choice or self.grid or [])

    def to_yaml_value(self) -> Any:
        if self.kind == "auto":
            return "auto"
        return self.fixed if self.kind == "fixed" else {self.kind: list(self.extremes())}


class DataMapping(StrictModel):
    """A dataset; the string form `NAME:ROOT` (e.g. `cifar100:~/data`) means {name, root}."""

    name: Literal["cifar100", "synthetic", "imagenet"] = Field(description="Dataset reader.")
    root: str = Field(description="Folder that holds (or will hold) the dataset.")
    download: bool = Field(False, description="Download with torchvision when missing (needs internet).")
    augment: Literal["standard", "autoaugment", "none"] = Field(
        "standard",
        description="standard: crop+flip on the device; autoaugment: + CIFAR AutoAugment (CPU workers).",
    )
    label_noise: float = Field(
        0.0, ge=0.0, lt=1.0, description="Symmetric label-noise rate on the training set."
    )
    noise_seed: int = 0
    generate: dict[str, Any] | None = Field(
        None, description="synthetic only: generator parameters (make-synthetic)."
    )
    validation: int = Field(
        0,
        ge=0,
        description="Images per class held out of the training split as a validation split (val_acc); 0: none.",
    )


class TeacherTraining(StrictModel):
    """Train the teacher before the search (once; reused from the cache on later runs)."""

    recipe: str = Field("teacher-cifar100", description="Recipe preset for the teacher.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Recipe field overrides.")


class TeacherConfig(StrictModel):
    """One teacher and its own search space (merged over the shared `space`)."""

    name: str | None = Field(None, description="Label used in results and MLflow (default: the model name).")
    model: str = Field(description="Registered model name, e.g. resnet32x4, wrn_40_2.")
    checkpoint: str | None = Field(
        None, description="Teacher weights (mdistiller/CRD, state dict or dkd-tune format)."
    )
    train: TeacherTraining | None = Field(
        None, description="Train the teacher instead of loading a checkpoint."
    )
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Per-teacher searched parameters."
    )
    non_target: Literal["as_is", "permuted"] = Field(
        "as_is",
        description="permuted: a negative control; each training image's non-target logits are shuffled "
        "(fixed per image), so accuracy and gap stay and the non-target knowledge is gone.",
    )

    @property
    def label(self) -> str:
        return self.name or self.model

    @model_validator(mode="after")
    def checkpoint_or_train(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give exactly one of checkpoint (a file) or train (a recipe)")
        return self


class SearchAlgorithm(StrictModel):
    algorithm: Literal["optuna", "random", "grid"] = Field("optuna", description="optuna: TPE; random; grid.")
    seed: int = Field(0, description="Seed of the sampler (and of trial seeds).")
    num_samples: int = Field(8, ge=1, description="Trials per teacher (grid: repetitions of the grid).")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once (default: as resources allow)."
    )


class Scheduler(StrictModel):
    type: Literal["asha", "none"] = Field("asha", description="asha: stop poor trials early; none.")
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA's eta: keep the top 1/eta at each rung.")
    max_t: int | None = Field(
        None, ge=1, description="Epochs of a full trial (default: the recipe's epochs)."
    )


class Resources(StrictModel):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (per worker).")
    gpu: float = Field(
        0.0, ge=0, description="GPUs per trial (per worker); a fraction packs trials on one GPU."
    )
    workers: int = Field(1, ge=1, description="Processes per trial; > 1 runs DDP through Ray Train.")

    @model_validator(mode="after")
    def gpu_share_is_possible(self) -> Resources:
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ValueError(f"gpu = {self.gpu}: more than one GPU must be a whole number")
        if self.workers > 1 and self.gpu not in (0, 1):
            raise ValueError(
                f"gpu = {self.gpu} with workers = {self.workers}: each DDP worker needs a whole GPU (gpu: 1) "
                "or none (gpu: 0); NCCL cannot share one GPU between ranks"
            )
        return self


class TeacherLogitCacheConfig(StrictModel):
    teacher_logits: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: cache the teacher's logits for every augmented view when views are finite."
    )
    dir: str | None = Field(None, description="Where caches live (default: <storage>/teacher_logits).")


class ProbeConfig(StrictModel):
    datasets: list[Literal["stl10", "tiny-imagenet"]] = Field(
        description="Linear-probe datasets (paper A.7)."
    )
    top_k: int = Field(3, ge=1, description="Probe the best k trials after the search.")
    data_root: str = Field("~/data", description="Folder holding stl10_binary/ and tiny-imagenet-200/.")


class SearchSpaceFile(StrictModel):
    """A dkd-tune search: data, student, teachers, recipe, searched parameters, algorithm, scheduler, resources."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Experiment name (Ray and MLflow)."
    )
    description: str = ""
    data: str | DataMapping = Field(description="Dataset: 'cifar100:~/data' or a mapping.")
    student: str = Field(description="Student model name, e.g. ShuffleV1.")
    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="Teachers, each searched separately."
    )
    recipe: str = Field("cifar100", description=f"Recipe preset: {', '.join(PRESETS)}.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Recipe fields fixed for every trial."
    )
    loss: Literal["ce", "kd", "dkd", "tckd", "nckd"] = Field("dkd", description="Loss mode of the trials.")
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Searched parameters shared by all teachers."
    )
    baselines: list[Literal["ce"]] = Field(
        default_factory=list,
        description="Reference trials run at full budget beside the search (ce: student alone).",
    )
    search: SearchAlgorithm = Field(default_factory=SearchAlgorithm)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    metric: Literal[METRICS] = Field("test_acc", description="Metric the search optimises.")  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    storage: str = Field(
        "./dkd_runs", description="Ray results and checkpoints (a path, or a URI on clusters)."
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."
    )
    cache: TeacherLogitCacheConfig = Field(default_factory=TeacherLogitCacheConfig)
    probe: ProbeConfig | None = None
    max_failures: int = Field(1, ge=0, description="Retries of a crashed trial from its last checkpoint.")
    compile: bool | None = Field(
        None, description="torch.compile the student (default: on for CUDA, off on CPU)."
    )

    @field_validator("overrides")
    @classmethod
    def overrides_are_recipe_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key not in RECIPE_FIELDS:
                raise ValueError(f"unknown recipe field{_did_you_mean(key, RECIPE_FIELDS)}")
        return value

    # ---- derived, typed views used downstream -------------------------------------------------

    def base_recipe(self, teacher: TeacherConfig | None) -> Recipe:
        """The recipe every trial of `teacher` starts from (preset for the pair + fixed overrides)."""
        return resolve_recipe(
            self.recipe,
            student=self.student,
            teacher=teacher.model if teacher else None,
            overrides=self.overrides,
            source="overrides",
        )

    def space_for(self, teacher: TeacherConfig | None) -> dict[str, Distribution]:
        return {**self.space, **(teacher.space if teacher else {})}

    def max_epochs(self) -> int:
        return self.scheduler.max_t or self.base_recipe(self.teachers[0] if self.teachers else None).epochs

    def data_spec_value(self) -> Any:
        return self.data if isinstance(self.data, str) else self.data.model_dump(exclude_none=True)


# ------------------------------------------------------------------------------------------------
# Loading


def load_search_space(path: str | Path, set_overrides: list[str] | tuple[str, ...] = ()) -> SearchSpaceFile:
    """Read, override and validate a search-space file; every problem is one UserInputError line."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    for assignment in set_overrides:
        apply_set_override(raw, assignment)
    try:
        space = SearchSpaceFile.model_validate(raw)
    except ValidationError as error:
        raise UserInputError(f"{path}: {describe_validation_error(error, SearchSpaceFile)}") from None
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


def apply_set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `--set a.b.c=value` (value parsed as YAML) to the raw mapping.

    A bare recipe field (`--set epochs=10`) means `overrides.epochs`; list items are indexed by
    number (`--set teachers.0.checkpoint=t.pth`).
    """
    if "=" not in assignment:
        raise UserInputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set search.num_samples=16")
    key, text = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise UserInputError(f"--set {key}: value {text!r} is not valid YAML") from None
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in RECIPE_FIELDS and parts[0] not in SearchSpaceFile.model_fields:
        parts = ["overrides", parts[0]]
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserInputError(
                    f"--set {key}: {'.'.join(parts[: depth + 1])} is not an index of the list"
                )
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise UserInputError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserInputError(f"--set {key}: {last!r} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


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
        return f"{key}: unknown key{_did_you_mean(str(loc[-1]), allowed)}"
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


def _did_you_mean(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    if close:
        return f" {key!r}; did you mean {close[0]!r}?"
    return f" {key!r}; expected one of {', '.join(allowed)}" if allowed else f" {key!r}"


# ------------------------------------------------------------------------------------------------
# Checks that need more than types


def check_search_space(space: SearchSpaceFile, path: Path) -> None:
    """Cross-field and file-system checks; raises one UserInputError line naming the key."""
    from dkd_tune.data import parse_data_spec
    from dkd_tune.models import list_models

    def fail(key: str, message: str) -> None:
        raise UserInputError(f"{path}: {key}: {message}")

    models = list_models()
    if space.student not in models:
        fail("student", f"unknown model {space.student!r}{_did_you_mean(space.student, models)}")
    if space.loss != "ce" and not space.teachers:
        fail("teachers", f"loss {space.loss!r} needs at least one teacher")
    labels = [teacher.label for teacher in space.teachers]
    for index, teacher in enumerate(space.teachers):
        key = f"teachers[{index}]"
        if labels.count(teacher.label) > 1:
            fail(f"{key}.name", f"label {teacher.label!r} is used by two teachers; give each a distinct name")
        if teacher.model not in models:
            fail(f"{key}.model", f"unknown model {teacher.model!r}{_did_you_mean(teacher.model, models)}")
        if teacher.checkpoint is not None and not resolve_path(teacher.checkpoint).is_file():
            fail(f"{key}.checkpoint", f"file {str(resolve_path(teacher.checkpoint))!r} not found")
        if teacher.train is not None:
            try:
                resolve_recipe(teacher.train.recipe, overrides=teacher.train.overrides, source=f"{key}.train")
            except UserInputError as error:
                raise UserInputError(f"{path}: {error}") from None
    try:
        data = parse_data_spec(space.data_spec_value(), source="data")
    except UserInputError as error:
        raise UserInputError(f"{path}: {error}") from None
    check_data_present(data, path)
    if space.metric.startswith("val_") and not data.validation:
        fail(
            "metric",
            f"{space.metric!r} needs a validation split; set data.validation (images per class held out "
            "of the training split), or use a test_ metric",
        )
    if data.name == "imagenet":
        for index, teacher in enumerate(space.teachers):
            if teacher.train is not None:
                fail(
                    f"teachers[{index}].train",
                    "ImageNet teachers are not trained here; give a checkpoint (e.g. torchvision's weights file)",
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


def check_teacher_checkpoints(space: SearchSpaceFile, data: Any, path: Path) -> None:
    """Each teacher file is readable, intact and holds its model with the dataset's class count."""
    from dkd_tune.data import dataset_num_classes
    from dkd_tune.models import matching_state_dict

    given = [(index, t) for index, t in enumerate(space.teachers) if t.checkpoint is not None]
    if not given:
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
    from dkd_tune.auto_beta import default_calibration_or_none

    if space.loss not in ("dkd", "nckd"):
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
                fail(key, f"loss {value!r} is not one of {', '.join(LOSS_MODES)}")
        return
    if distribution.kind == "auto":
        if name != "beta":
            fail(key, f"auto is auto-beta's prior for beta; {name} needs values to search")
        if algorithm != "optuna":
            fail(key, f"beta: auto seeds Optuna's TPE with auto-beta's prediction; needs search.algorithm optuna, "
                      f"not {algorithm!r}")  # fmt: skip
        return
    if name not in RECIPE_FIELDS or name == "lr_milestones":
        searchable = [field for field in RECIPE_FIELDS if field != "lr_milestones"] + ["loss"]
        fail(key, f"cannot search {name!r}{_did_you_mean(name, searchable)}")
    if distribution.kind == "grid" and algorithm == "optuna":
        fail(key, "grid values need search.algorithm 'grid' or 'random'; use choice with optuna")
    if algorithm == "grid" and distribution.kind not in ("grid", "choice", "fixed"):
        fail(key, f"search.algorithm 'grid' needs grid, choice or fixed values, not {distribution.kind}")
    if name in INTEGER_FIELDS and distribution.kind in ("uniform", "loguniform"):
        fail(key, f"{name} is an integer; use int: [low, high] or choice")
    for value in distribution.extremes():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(key, f"value {value!r} is not a finite number")
        try:
            validate_recipe(_with_value(base, name, value), source=key)
        except UserInputError as error:
            fail(key, str(error).removeprefix(f"{key}: "))


def _with_value(recipe: Recipe, name: str, value: Any) -> Recipe:
    return dataclasses.replace(recipe, **{name: int(value) if name in INTEGER_FIELDS else float(value)})


def check_data_present(data: Any, path: Path) -> None:
    """A dataset that will not be downloaded or generated must already be on disk."""
    from dkd_tune.data import dataset_problem

    problem = dataset_problem(data)
    if problem:
        raise UserInputError(f"{path}: data: {problem}")


def check_tracking_uri(uri: str | None, source: str) -> None:
    """A tracking URI of a kind MLflow can open (checked without opening it: nothing is created)."""
    if not uri:
        return
    scheme = urlsplit(uri).scheme
    if scheme in MLFLOW_SCHEMES or (len(scheme) == 1 and uri[1:2] == ":"):  # C:\... is a folder
        return
    plugins = {entry.name for entry in entry_points(group="mlflow.tracking_store")}
    if scheme not in plugins:
        raise UserInputError(
            f"{source} {uri!r}: unknown scheme {scheme!r}; expected an MLflow store such as "
            "sqlite:///path/mlflow.db, a folder, or http(s)://host:port"
        )


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
