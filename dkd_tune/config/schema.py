"""The search-space YAML schema: the one place that turns a file (plus `--set` overrides) into typed objects.

Everything is checked here, before Ray, a GPU or a tracking store is touched: syntax, unknown
keys (with the closest valid key), types, impossible values, unknown models, missing
checkpoints and datasets. Each failure is one line naming the file and the key.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dkd_tune.config.searchers import SEARCHER_NAMES, SEARCHERS
from dkd_tune.core.errors import did_you_mean
from dkd_tune.core.losses import LOSS_MODE_NAMES, LOSS_MODES
from dkd_tune.core.recipes import (
    PRESETS,
    RECIPE_FIELDS,
    Recipe,
    resolve_recipe,
)
from dkd_tune.data.spec import AUGMENTATIONS, DATASET_NAMES, DataSpec, parse_data_spec
from dkd_tune.teacher.logit_interventions import LogitIntervention

METRICS = (
    "test_acc", "best_test_acc", "test_acc_top5", "test_loss", "train_loss", "train_acc", "val_acc", "val_loss",
)  # fmt: skip
DETECTION_METRICS = (
    "test_ap",
    "best_test_ap",
    "test_ap50",
    "test_ap75",
    "val_ap",
    "train_loss",
)  # COCO AP, %


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class PriorBelief(StrictModel):
    """Where a searched parameter's best value probably lies: a normal belief the search starts from."""

    centre: float = Field(description="The most likely best value (the first trial runs here).")
    spread: float = Field(
        gt=0,
        description="Standard deviation of the belief: in octaves (factors of 2) for loguniform, in the "
        "parameter's units for uniform and int.",
    )


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
        description="beta only (`beta: auto`): auto-beta's predictive distribution for the teacher's gap is "
        "the search's prior (optuna only): the first trial at its centre, then the prior-guided sampler "
        "over the calibrated range.",
    )
    prior: PriorBelief | None = Field(
        None,
        description="With uniform, loguniform or int and algorithm optuna: a belief {centre, spread} the "
        "prior-guided sampler starts from (the first trial at the centre); results decide how much it counts.",
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
        if self.prior is not None:
            bounds = self.uniform or self.loguniform or self.int_range
            if bounds is None:
                raise ValueError("prior needs a uniform, loguniform or int range to search around")
            if not bounds[0] <= self.prior.centre <= bounds[1]:
                raise ValueError(
                    f"prior centre {self.prior.centre:g} is outside the range [{bounds[0]:g}, {bounds[1]:g}]"
                )
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
        if self.kind == "fixed":
            return self.fixed
        value: dict[str, Any] = {self.kind: list(self.extremes())}
        if self.prior is not None:
            value["prior"] = {"centre": self.prior.centre, "spread": self.prior.spread}
        return value


class DataMapping(StrictModel):
    """A dataset; the string form `NAME:ROOT` (e.g. `cifar100:~/data`) means {name, root}.

    The keys and their meanings, for the schema; their values are checked in one place for both forms,
    `dkd_tune.data.spec.parse_data_spec` (`SearchSpaceFile.data_is_a_spec`), before this model sees them.
    """

    name: Literal[DATASET_NAMES] = Field(description="Dataset reader.")  # type: ignore[valid-type]
    root: str = Field(description="Folder that holds (or will hold) the dataset.")
    download: bool = Field(False, description="Download with torchvision when missing (needs internet).")
    augment: Literal[AUGMENTATIONS] = Field(  # type: ignore[valid-type]
        "standard",
        description="standard: crop+flip on the device; autoaugment: + CIFAR AutoAugment (CPU workers).",
    )
    label_noise: float = Field(0.0, description="Symmetric label-noise rate on the training set, in [0, 1).")
    noise_seed: int = Field(0, description="Seed of the label noise (which labels are flipped, and to what).")
    generate: dict[str, Any] | None = Field(
        None,
        description="synthetic and synthetic-coco only: generator parameters (make-synthetic; "
        "synthetic-coco: train_images, val_images, image_size, seed).",
    )
    validation: int = Field(
        0,
        description="Images per class (detection: images in all) held out of the training split as a "
        "validation split (val_acc, val_ap); 0: none.",
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
    non_target: Literal["as_is", "permuted", "permuted_within_superclass"] = Field(
        "as_is",
        description="permuted: a negative control; each training image's non-target logits are shuffled "
        "(fixed per image), so accuracy and gap stay and the non-target knowledge is gone; "
        "permuted_within_superclass: shuffled only among each superclass's classes (coarse knowledge stays).",
    )
    target_shift: float = Field(
        0.0,
        description="An intervention for auto-beta's experiments: the target logit of every training image "
        "raised by this much (the gap moves by it; the non-target distribution NCKD transfers does not).",
    )
    logit_scale: float = Field(
        1.0,
        gt=0,
        description="An intervention: every training logit multiplied by this (gap and softness move together).",
    )

    @property
    def label(self) -> str:
        return self.name or self.model

    @property
    def intervention(self) -> LogitIntervention:
        """What the search does to this teacher's training logits (identity unless the file asks)."""
        return LogitIntervention(
            target_shift=self.target_shift, scale=self.logit_scale, non_target=self.non_target
        )

    @model_validator(mode="after")
    def checkpoint_or_train(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give exactly one of checkpoint (a file) or train (a recipe)")
        return self


class SearchAlgorithm(StrictModel):
    algorithm: Literal[SEARCHER_NAMES] = Field(  # type: ignore[valid-type]
        "optuna", description="; ".join(f"{row.name}: {row.description}" for row in SEARCHERS.values()) + "."
    )
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

    @field_validator("teacher_logits", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted on/off as a boolean: take it as the word the user wrote.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


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
    description: str = Field("", description="Free text, logged with the search.")
    data: str | DataMapping = Field(description="Dataset: 'cifar100:~/data' or a mapping.")
    student: str = Field(description="Student model name, e.g. ShuffleV1.")
    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="Teachers, each searched separately."
    )
    recipe: str = Field("cifar100", description=f"Recipe preset: {', '.join(PRESETS)}.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Recipe fields fixed for every trial."
    )
    loss: Literal[LOSS_MODE_NAMES] = Field(  # type: ignore[valid-type]
        "dkd",
        description="Loss mode of the trials: "
        + "; ".join(f"{mode.name}: {mode.objective}" for mode in LOSS_MODES.values())
        + ".",
    )
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Searched parameters shared by all teachers."
    )
    baselines: list[Literal["ce"]] = Field(
        default_factory=list,
        description="Reference trials run at full budget beside the search (ce: student alone).",
    )
    search: SearchAlgorithm = Field(default_factory=SearchAlgorithm, description="How trials are chosen.")
    scheduler: Scheduler = Field(default_factory=Scheduler, description="How trials are stopped early.")
    resources: Resources = Field(default_factory=Resources, description="What each trial gets.")
    metric: Literal[tuple(dict.fromkeys(METRICS + DETECTION_METRICS))] = Field(  # type: ignore[misc]
        "test_acc", description="Metric the search optimises (detection: test_ap, val_ap, ...: COCO AP in %)."
    )
    mode: Literal["max", "min"] = Field("max", description="Whether the metric is maximised or minimised.")
    storage: str = Field(
        "./dkd_runs", description="Ray results and checkpoints (a path, or a URI on clusters)."
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)."
    )
    cache: TeacherLogitCacheConfig = Field(
        default_factory=TeacherLogitCacheConfig, description="The teacher-logit cache."
    )
    probe: ProbeConfig | None = Field(
        None, description="Linear probes of the best students after the search."
    )
    max_failures: int = Field(1, ge=0, description="Retries of a crashed trial from its last checkpoint.")
    compile: bool | None = Field(
        None, description="torch.compile the student (default: on for CUDA, off on CPU)."
    )

    @field_validator("data", mode="before")
    @classmethod
    def data_is_a_spec(cls, value: Any) -> Any:
        """Both forms of `data:` pass the one data-spec check (a `UserInputError` naming the key) first."""
        parse_data_spec(value, source="data")
        return value

    @field_validator("overrides")
    @classmethod
    def overrides_are_recipe_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key not in RECIPE_FIELDS:
                raise ValueError(f"unknown recipe field{did_you_mean(key, RECIPE_FIELDS)}")
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

    @cached_property
    def data_spec(self) -> DataSpec:
        """The `data:` value parsed once into the one typed value every layer below uses."""
        value = self.data if isinstance(self.data, str) else self.data.model_dump(exclude_none=True)
        return parse_data_spec(value, source="data")
