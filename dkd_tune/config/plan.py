"""How a validated search splits into parts (reference baselines, one per teacher) and what each part's trials share."""

from __future__ import annotations

from dkd_tune.config.schema import SearchSpaceFile, TeacherConfig
from dkd_tune.core.losses import LOSS_MODES
from dkd_tune.data import dataset_num_classes
from dkd_tune.trial import TrialPlan, trial_recipe

BASELINE_PREFIX = "baseline-"


def search_parts(space: SearchSpaceFile) -> list[tuple[str, TeacherConfig | None]]:
    """The Ray experiments of a search: reference baselines first, then one per teacher."""
    parts: list[tuple[str, TeacherConfig | None]] = [(f"{BASELINE_PREFIX}{b}", None) for b in space.baselines]
    if not LOSS_MODES[space.loss].needs_teacher and not space.teachers:
        return [(space.loss, None), *parts]
    return parts + [(teacher.label, teacher) for teacher in space.teachers]


def trial_plan(space: SearchSpaceFile, teacher: TeacherConfig | None, artifacts, part_name: str):
    """What every trial of one part shares; fixed (non-searched) values are folded into the recipe."""
    data_spec = space.data_spec
    is_baseline = part_name.startswith(BASELINE_PREFIX)
    base = space.base_recipe(teacher)
    searched = {} if is_baseline else space.space_for(teacher)
    fixed = {name: d.fixed for name, d in searched.items() if d.kind == "fixed"}
    loss_mode = part_name.removeprefix(BASELINE_PREFIX) if is_baseline else space.loss
    return TrialPlan(
        student=space.student,
        num_classes=dataset_num_classes(data_spec),
        dataset_name=data_spec.name,
        augment=data_spec.augment,
        loss_mode=loss_mode,
        base_recipe=trial_recipe(base, fixed),
        teacher=artifacts,
        max_epochs=space.max_epochs(),
        compile=space.compile,
        cpus_per_trial=space.resources.cpu,
        task=data_spec.kind.task,
    )


def rung_warnings(space: SearchSpaceFile, source: str) -> list[str]:
    """One line per search file whose first ASHA rung falls strictly inside the distillation warm-up.

    Until the warm-up ends the distillation term has only part of its weight, and accuracy there
    barely ranks the trials (docs/benchmarks.md: Spearman 0.16 with the final accuracy one epoch
    into the demo's warm-up, 0.79 at its end).
    """
    if space.scheduler.type != "asha" or not LOSS_MODES[space.loss].needs_teacher:
        return []
    grace = space.scheduler.grace_period
    longest = 0
    for teacher in space.teachers:
        warmup = space.space_for(teacher).get("warmup_epochs")
        bounds = [space.base_recipe(teacher).warmup_epochs]
        if warmup is not None:
            bounds += [
                max(warmup.int_range or warmup.uniform or warmup.choice or warmup.grid or [0]),
                warmup.fixed or 0,
            ]
        longest = max(longest, *bounds)
    if grace >= longest:
        return []
    return [
        f"dkd-tune: warning: {source}: scheduler.grace_period {grace} puts ASHA's first rung inside the "
        f"distillation warm-up (warmup_epochs up to {longest}), where accuracy barely ranks the trials; "
        f"set scheduler.grace_period to at least {longest}"
    ]
