"""`dkd-tune validate-beta`: is auto-beta's beta as good as the best beta? A teacher x beta x seed grid of full runs is the ground truth.

A validation is a folder `<storage>/<name>/` holding `validation.json` (its state), the grid
search `<name>-grid` (an ordinary search: every teacher trained once into `teachers/`, its gap
measured, then every grid beta with every seed trained for the full budget, nothing pruned, plus
the student trained alone), and what is computed from the grid: the per-epoch curves
(`curves.parquet`, the oracle of replayed searches), the ASHA-pruned Optuna searches replayed on
those curves (`replays.parquet`), the comparison of auto-beta (leave-one-teacher-out), the
constant baseline and the searches with bootstrap intervals, the calibration fitted on every
teacher (`calibration.json`) and the report. The grid search is run and resumed by
`dkd_tune.search.driver`, so an interrupted validation continues where it stopped when the same
command is run again. In MLflow, the validation is one run with the grid search nested under it.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.validation_report import ValidationOutcome
from dkd_tune.config.folders import STATE_FILE, VALIDATION_STATE_FILE
from dkd_tune.config.loading import load_search_space
from dkd_tune.config.schema import SearchSpaceFile
from dkd_tune.config.search_state import SearchState, ValidationState
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_text
from dkd_tune.search.interruption import SearchInterrupted, as_interruption, interruption_guard
from dkd_tune.teacher.preparation import TeacherArtifacts
from dkd_tune.tracking.store import TrackingStore

CONFIG_FILE = "validate.yaml"
GRID_CONFIG_FILE = "grid.yaml"
GRID_SUFFIX = "-grid"
CURVES_FILE = "curves.parquet"
REPLAYS_FILE = "replays.parquet"
CALIBRATION_FILE = "calibration.json"
SEARCHED = ("beta", "seed")
DEFAULT_RESAMPLES = 2000
DEFAULT_SEARCH_TRIALS = 12


@dataclass
class ValidationOptions:
    """Command-line choices of `dkd-tune validate-beta`."""

    name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    calibration: str | None = None  # a calibration to check on this grid (e.g. one fitted on another dataset)
    resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples
    search_trials: int = DEFAULT_SEARCH_TRIALS  # trials of each replayed ASHA-pruned Optuna search
    command: str = ""  # the command line, for the report
    log: Callable[[str], None] = print


def check_validation_space(space: SearchSpaceFile, source: Path) -> None:
    """A validation is a DKD grid over a log2 ladder of betas and >= 2 seeds for >= 3 teachers, chosen on val_acc."""
    if space.loss != "dkd":
        raise UserInputError(
            f"{source}: loss: validate-beta needs loss 'dkd' (beta is DKD's weight), got {space.loss!r}"
        )
    if len(space.teachers) < 3:
        raise UserInputError(
            f"{source}: teachers: validate-beta needs at least 3 teachers (each prediction is fitted on the "
            f"others, and a fit needs 2), got {len(space.teachers)}"
        )
    if space.metric != "val_acc":
        raise UserInputError(
            f"{source}: metric: validate-beta chooses on the validation split; set metric: val_acc "
            f"(and data.validation), got {space.metric!r}"
        )
    if space.search.algorithm != "grid" or space.search.num_samples != 1:
        raise UserInputError(
            f"{source}: search: the ground truth is a grid; set search.algorithm: grid and num_samples: 1 "
            f"(got {space.search.algorithm!r}, {space.search.num_samples})"
        )
    if space.scheduler.type != "asha":
        raise UserInputError(
            f"{source}: scheduler.type: validate-beta replays ASHA-pruned searches with these rungs; "
            f"set scheduler.type: asha (the grid itself is never pruned), got {space.scheduler.type!r}"
        )
    for index, teacher in enumerate(space.teachers):
        where = f"{source}: teachers[{index}] ({teacher.label})"
        distributions = space.space_for(teacher)
        beta, seed = distributions.get("beta"), distributions.get("seed")
        if beta is None or beta.kind != "grid" or len(set(beta.grid)) < 3:
            raise UserInputError(
                f"{where}: beta must be a grid of at least 3 betas (e.g. beta: {{grid: [0.5, 1, 2, 4, 8]}})"
            )
        ladder = sorted(float(b) for b in set(beta.grid))
        if ladder[0] <= 0 or any(
            not math.isclose(b / a, 2.0, rel_tol=1e-6) for a, b in itertools.pairwise(ladder)
        ):
            raise UserInputError(
                f"{where}: beta grid {ladder} must be a log2 ladder (each beta twice the previous)"
            )
        if seed is None or seed.kind != "grid" or len(set(seed.grid)) < 2:
            raise UserInputError(
                f"{where}: seed must be a grid of at least 2 seeds (e.g. seed: {{grid: [0, 1, 2]}}): "
                "the noise of one cell is measured across seeds"
            )
        others = sorted(
            name for name, d in distributions.items() if d.kind != "fixed" and name not in SEARCHED
        )
        if others:
            raise UserInputError(
                f"{source}: space.{others[0]}: validate-beta varies beta and seed only, with everything else "
                f"fixed by the recipe; give {others[0]} one value (or use `dkd-tune run` to search it)"
            )


def validate_beta(space: SearchSpaceFile, source: Path, options: ValidationOptions) -> ValidationOutcome:
    """Run (or resume) the validation described by `space` and write its report."""
    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.store import FAILED, KILLED

    check_validation_space(space, source)
    name = options.name or space.name
    folder = Path(options.storage or space.storage).expanduser().resolve() / name
    state = _open_state(folder, space, source, name, options)
    started = time.time()
    load_start = os.getloadavg()[0]
    store = open_store(state.tracking_uri)
    run_id = _validation_run(store, space, state, folder)
    try:
        with interruption_guard(options.log):
            outcome = _execute(space, folder, state, run_id, options, started, load_start)
    except (SearchInterrupted, KeyboardInterrupt) as error:
        interruption = as_interruption(error)
        state.status = "interrupted"
        state.sessions.append(_session(started, "interrupted"))
        state.save(folder)
        _terminate_quietly(store, run_id, KILLED, options)
        # The same command resumes the validation (and the search inside it).
        interruption.resume_command = options.command or f"dkd-tune validate-beta {source}"
        raise interruption from None
    except BaseException:
        state.sessions.append(_session(started, "failed"))
        state.save(folder)
        _terminate_quietly(store, run_id, FAILED, options)
        raise
    return outcome


def _terminate_quietly(store: TrackingStore, run_id: str, status: str, options: ValidationOptions) -> None:
    """End the validation's MLflow run; an unreachable store is reported, not raised over the real error."""
    try:
        store.end_run(run_id, status)
    except Exception as error:
        options.log(f"dkd-tune: warning: MLflow run {run_id} not marked {status} ({type(error).__name__})")


def _execute(space, folder, state, run_id, options, started, load_start) -> ValidationOutcome:
    from analysis.beta_ground_truth import grid_from_results
    from analysis.results import load_trial_histories
    from analysis.validation_report import ValidationContext, analyse, write_validation_outputs
    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.runs import now_ms
    from dkd_tune.tracking.store import FINISHED

    name = state.name
    grid_path = folder / GRID_CONFIG_FILE
    atomic_write_text(grid_path, yaml.safe_dump(grid_space(space, name), sort_keys=False))
    grid_dir = _finished_search(
        load_search_space(grid_path), folder, f"{name}{GRID_SUFFIX}", grid_path, run_id, state, options
    )
    frame = pd.read_parquet(grid_dir / "results.parquet")
    family = _family(frame)
    grid_state = SearchState.load(grid_dir)
    grid = grid_from_results(frame, grid_state.teachers)
    curves_frame = _write_curves(frame, load_trial_histories(grid_dir), folder / CURVES_FILE)
    options.log(
        f"dkd-tune: validate-beta: grid of {len(grid.teachers)} teachers x {len(grid.betas)} betas x "
        f"{len(grid.seeds)} seeds complete; replaying ASHA-pruned Optuna searches on its curves"
    )
    from analysis.grid_curves import curves_from_long

    curves = curves_from_long(curves_frame)
    replays = _replayed_searches(space, grid, curves, folder, options)
    search_picks, search_epochs = _search_picks(grid, replays)
    checked = None
    if options.calibration:
        from dkd_tune.teacher.auto_beta import load_calibration

        checked = load_calibration(options.calibration, family)
    this_session = _session(started, "done")
    context = ValidationContext(
        name=name,
        space=space,
        source=str(state.source),
        command=options.command or state.command,
        sessions=[*state.sessions, this_session],
        machine=_machine(),
        load_average=(load_start, os.getloadavg()[0]),
        grid_dir=grid_dir,
        family=family,
        checked_calibration=checked,
        checked_calibration_path=options.calibration,
        interventions=_interventions(grid_state.teachers),
    )
    options.log(
        "dkd-tune: validate-beta: held-out predictions (each teacher, each architecture) and a bootstrap over "
        f"teachers ({options.resamples} resamples)"
    )
    analysis = analyse(
        grid,
        context,
        search_picks=search_picks,
        search_epochs=search_epochs,
        resamples=options.resamples,
        seed=space.search.seed,
    )
    outcome = write_validation_outputs(context, grid, analysis, replays, folder, curves)
    store = open_store(state.tracking_uri)
    store.log_metrics(run_id, outcome_metrics(analysis), 0, now_ms())
    for path in [outcome.report_path, outcome.comparison_path, outcome.calibration_path, *outcome.figures]:
        store.log_artifact(run_id, path)
    for path in (folder / CURVES_FILE, folder / REPLAYS_FILE, grid_dir / "results.parquet"):
        store.log_artifact(run_id, path, folder="grid")
    store.end_run(run_id, FINISHED)
    state.status = "done"
    state.sessions.append(this_session)
    state.save(folder)
    return outcome


def grid_space(space: SearchSpaceFile, name: str) -> dict[str, Any]:
    """The ground truth's search file: the validation file with nothing pruned (every cell trains its full budget)."""
    raw = space.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["scheduler"] = {**raw.get("scheduler", {}), "type": "none"}
    raw.pop("probe", None)
    raw["description"] = f"Ground-truth grid of validation {name!r} (written by validate-beta)"
    return raw


def _write_curves(frame: pd.DataFrame, histories: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Every grid run's per-epoch validation and test top-1 (teacher, beta, seed, epoch), as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dkd_tune.core.files import atomic_path

    keys = frame[["trial_id", "part", "teacher", "teacher_gap", "beta", "seed", "status"]]
    columns = ["trial_id", "epoch", "val_acc", "test_acc", "epoch_time_s"]
    curves = keys.merge(histories[[c for c in columns if c in histories]], on="trial_id", how="inner")
    curves = curves.sort_values(["part", "beta", "seed", "epoch"]).reset_index(drop=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(curves, preserve_index=False), tmp)
    return curves


def _replayed_searches(space, grid, curves, folder: Path, options) -> pd.DataFrame:
    """One replayed ASHA-pruned Optuna search per teacher and seed (kept in replays.parquet: a resume reuses it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dkd_tune.core.files import atomic_path
    from dkd_tune.search.replay import replay_search

    path = folder / REPLAYS_FILE
    if path.is_file():
        replays = pd.read_parquet(path)
        if len(replays) == len(grid.teachers) * len(grid.seeds):
            return replays
    replay_space = space.model_copy(
        update={
            "search": space.search.model_copy(
                update={"algorithm": "optuna", "num_samples": options.search_trials}
            )
        }
    )
    rows = []
    for teacher in grid.teachers:
        for index, seed in enumerate(grid.seeds):
            result = replay_search(
                replay_space,
                curves,
                teacher,
                index,
                beta_range=(float(grid.betas[0]), float(grid.betas[-1])),
            )
            rows.append(
                {
                    "teacher": teacher,
                    "seed": seed,
                    "chosen_beta": result.chosen_beta,
                    "trial_epochs": result.trial_epochs,
                    "trials": len(result.trials),
                    "completed": int(result.trials["completed"].sum()) if len(result.trials) else 0,
                }
            )
    replays = pd.DataFrame(rows)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(replays, preserve_index=False), tmp)
    return replays


def _search_picks(grid, replays: pd.DataFrame):
    """(teachers, seeds) grid indices the replayed searches chose, and their trial-epochs."""
    import numpy as np

    picks = np.zeros((len(grid.teachers), len(grid.seeds)), dtype=int)
    epochs = np.zeros((len(grid.teachers), len(grid.seeds)))
    for row in replays.itertuples():
        i, k = grid.teachers.index(row.teacher), grid.seeds.index(int(row.seed))
        beta = row.chosen_beta if math.isfinite(row.chosen_beta) else grid.betas[0]
        picks[i, k] = int(np.argmin(np.abs(np.log2(grid.betas) - math.log2(beta))))
        epochs[i, k] = row.trial_epochs
    return picks, epochs


def outcome_metrics(analysis) -> dict[str, float]:
    """Per fold kind: mean regret per method, the regret differences with their intervals, the predictive
    interval's coverage and the RMS error, for the validation's MLflow run (`loao_`: leave one architecture
    out; `loto_`: leave one teacher out)."""
    metrics = {}
    for kind, comparison in analysis.comparisons.items():
        prefix = {"architecture": "loao_", "teacher": "loto_"}[kind]
        for method, (mean, low, high) in comparison.mean_regret.items():
            metrics.update({f"{prefix}{method}_mean_regret": mean, f"{prefix}{method}_regret_ci_high": high})
            metrics[f"{prefix}{method}_regret_ci_low"] = low
        for key, (mean, low, high) in comparison.differences.items():
            slug = prefix + key.replace("-", "_minus_")
            metrics.update({f"{slug}": mean, f"{slug}_ci_low": low, f"{slug}_ci_high": high})
        metrics.update(
            {f"{prefix}coverage_80": comparison.coverage, f"{prefix}rms_error_octaves": comparison.rms_error}
        )
    return {key: float(value) for key, value in metrics.items() if math.isfinite(value)}


def _interventions(artifacts: Mapping[str, TeacherArtifacts]) -> dict[str, dict]:
    """The grid's intervened teachers with their base teacher (the identity teacher of the same checkpoint),
    or {} when the grid has none."""
    if all(a.intervention.is_identity for a in artifacts.values()):
        return {}
    bases = {a.checkpoint: label for label, a in artifacts.items() if a.intervention.is_identity}
    return {
        label: {"base": bases.get(a.checkpoint, Path(a.checkpoint).parent.name), **a.intervention.to_dict()}
        for label, a in artifacts.items()
    }


def _open_state(folder: Path, space: SearchSpaceFile, source: Path, name: str, options) -> ValidationState:
    """The validation's state: created, or read back (resume) after checking it is the same validation."""
    config = yaml.safe_dump(space.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
    state_path = folder / VALIDATION_STATE_FILE
    if state_path.is_file():
        stored = load_search_space(folder / CONFIG_FILE).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        if stored != space.model_dump(mode="json", by_alias=True, exclude_none=True):
            raise UserInputError(
                f"{folder}: a validation named {name!r} exists with a different configuration; "
                "pass another --name (or remove that folder to start over)"
            )
        state = ValidationState.load(folder)
        if options.tracking_uri:
            state.tracking_uri = options.tracking_uri
        options.log(f"dkd-tune: validate-beta: resuming validation '{name}' in {folder}")
        return state
    if folder.exists() and any(folder.iterdir()):
        raise UserInputError(
            f"{folder}: exists and is not a validation folder; pass another --name or --storage"
        )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_FILE, config)
    from dkd_tune.tracking.connect import absolute_tracking_uri

    state = ValidationState.new(
        name, source, options.command, absolute_tracking_uri(options.tracking_uri or space.tracking_uri)
    )
    state.save(folder)
    options.log(f"dkd-tune: validate-beta: validation '{name}' in {folder}")
    return state


def _validation_run(
    store: TrackingStore, space: SearchSpaceFile, state: ValidationState, folder: Path
) -> str:
    from dkd_tune.tracking.runs import TAG_SEARCH, standard_tags

    run_id = state.validation_run_id
    if run_id:
        store.reopen(run_id)
        return run_id
    tags = {
        **standard_tags("validate-beta"),
        TAG_SEARCH: state.name,
        "student": space.student,
        "teachers": ", ".join(teacher.label for teacher in space.teachers),
    }
    run_id = store.start_run(store.experiment(space.name), name=state.name, tags=tags)
    store.log_params(run_id, space.model_dump(mode="json", by_alias=True, exclude_none=True))
    store.log_artifact(run_id, folder / CONFIG_FILE)
    state.validation_run_id = run_id
    state.save(folder)
    return run_id


def _finished_search(space, folder: Path, name: str, source: Path, run_id: str, state, options) -> Path:
    """Run the search `name` in `folder`, resume it if it was interrupted, or return it if it is done."""
    from dkd_tune.search.driver import resume_search, run_search
    from dkd_tune.search.options import SearchOptions

    search_dir = folder / name
    search_options = SearchOptions(
        name=name,
        storage=str(folder),
        tracking_uri=state.tracking_uri,
        address=options.address,
        log=options.log,
        parent_run_id=run_id,
        teachers_dir=str(folder.parent / "teachers"),  # shared with the storage's other validations
        register_students=False,  # a grid's cells are ground truth, not students to serve
    )
    if not (search_dir / STATE_FILE).is_file():
        return run_search(space, source, search_options).experiment_dir
    search_state = SearchState.load(search_dir)
    stored = load_search_space(search_dir / "search.yaml").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    if stored != space.model_dump(mode="json", by_alias=True, exclude_none=True):
        raise UserInputError(
            f"{search_dir}: holds a search with another configuration than this validation needs; "
            "remove that folder to run it again"
        )
    if search_state.status == "done" and (search_dir / "results.parquet").is_file():
        options.log(f"dkd-tune: validate-beta: search '{name}' already finished, kept as is")
        return search_dir
    return resume_search(str(search_dir), search_options).experiment_dir


def _family(frame: pd.DataFrame) -> str:
    families = frame["dataset_family"].dropna().unique()
    if len(families) != 1:
        raise UserInputError(
            f"the search's trials name {len(families)} dataset families; expected exactly one"
        )
    return str(families[0])


def _session(started: float, outcome: str) -> dict[str, Any]:
    """One invocation of the command: when it started, how long it ran, how it ended (the report sums them)."""
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "outcome": outcome,
    }


def _machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, torch {torch.__version__}"
    )
