"""`dkd-tune validate-beta`: does auto-beta land near the beta a search finds? Search, predict held out, train at the prediction, compare.

A validation is a folder `<storage>/<name>/` holding `validation.json` (its state), the beta
search `<name>-search` (an ordinary search: one ASHA-pruned Optuna part per teacher, teachers
trained once into `teachers/` and their gaps measured), the full runs at the predicted betas
`<name>-autobeta` (an ordinary grid search over those betas, reusing the trained teachers) and
the report. Both searches are run and resumed by `dkd_tune.search`, so an interrupted validation
continues where it stopped when the same command is run again. In MLflow, the validation is one
run with both searches' parent runs nested under it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dkd_tune.config import SearchSpaceFile, load_search_space
from dkd_tune.errors import UserInputError
from dkd_tune.interruption import SearchInterrupted, as_interruption, interruption_guard
from dkd_tune.storage import atomic_write_json, atomic_write_text

STATE_FILE = "validation.json"
CONFIG_FILE = "validate.yaml"
AUTOBETA_CONFIG_FILE = "autobeta.yaml"
SEARCH_SUFFIX = "-search"
AUTOBETA_SUFFIX = "-autobeta"
SEARCHED = ("beta",)


@dataclass
class ValidationOptions:
    """Command-line choices of `dkd-tune validate-beta`."""

    name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    calibration: str | None = (
        None  # a calibration file for the dataset's family, evaluated beside leave-one-out
    )
    command: str = ""  # the command line, for the report
    log: Callable[[str], None] = print


@dataclass
class ValidationOutcome:
    folder: Path
    report_path: Path
    evaluation_path: Path
    compute_path: Path
    figures: list[Path]
    summary: str
    evaluation: pd.DataFrame = field(repr=False)


def check_validation_space(space: SearchSpaceFile, source: Path) -> None:
    """A validation searches beta alone, for at least three teachers, with the DKD loss; one line if not."""
    if space.loss != "dkd":
        raise UserInputError(
            f"{source}: loss: validate-beta needs loss 'dkd' (beta is DKD's weight), got {space.loss!r}"
        )
    if len(space.teachers) < 3:
        raise UserInputError(
            f"{source}: teachers: validate-beta needs at least 3 teachers (each prediction is fitted on the "
            f"others' best betas, and a fit needs 2), got {len(space.teachers)}"
        )
    for index, teacher in enumerate(space.teachers):
        distributions = space.space_for(teacher)
        beta = distributions.get("beta")
        if beta is None or beta.kind not in ("loguniform", "uniform", "choice"):
            raise UserInputError(
                f"{source}: teachers[{index}] ({teacher.label}): beta must be searched "
                "(e.g. space: {beta: {loguniform: [0.25, 16]}})"
            )
        others = sorted(
            name for name, d in distributions.items() if d.kind != "fixed" and name not in SEARCHED
        )
        if others:
            raise UserInputError(
                f"{source}: space.{others[0]}: validate-beta searches beta only, with everything else fixed by the "
                f"recipe; give {others[0]} one value (or use `dkd-tune run` to search it)"
            )


def validate_beta(space: SearchSpaceFile, source: Path, options: ValidationOptions) -> ValidationOutcome:
    """Run (or resume) the validation described by `space` and write its report."""
    from dkd_tune import tracking

    check_validation_space(space, source)
    name = options.name or space.name
    folder = Path(options.storage or space.storage).expanduser().resolve() / name
    state = _open_state(folder, space, source, name, options)
    started = time.time()
    load_start = os.getloadavg()[0]
    client = tracking.client_for(state["tracking_uri"])
    run_id = _validation_run(client, space, state, folder)
    try:
        with interruption_guard(options.log):
            outcome = _execute(space, folder, state, run_id, options, started, load_start)
    except (SearchInterrupted, KeyboardInterrupt) as error:
        interruption = as_interruption(error)
        state["status"] = "interrupted"
        state.setdefault("sessions", []).append(_session(started, "interrupted"))
        atomic_write_json(folder / STATE_FILE, state)
        _terminate_quietly(client, run_id, "KILLED", options)
        # The same command resumes the validation (and the search inside it).
        interruption.resume_command = options.command or f"dkd-tune validate-beta {source}"
        raise interruption from None
    except BaseException:
        state.setdefault("sessions", []).append(_session(started, "failed"))
        atomic_write_json(folder / STATE_FILE, state)
        _terminate_quietly(client, run_id, "FAILED", options)
        raise
    return outcome


def _terminate_quietly(client, run_id: str, status: str, options) -> None:
    """End the validation's MLflow run; an unreachable store is reported, not raised over the real error."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as error:
        options.log(f"dkd-tune: warning: MLflow run {run_id} not marked {status} ({type(error).__name__})")


def _execute(space, folder, state, run_id, options, started, load_start) -> ValidationOutcome:
    from analysis.beta_predictions import betas_to_train, evaluation_rows, teacher_betas
    from analysis.results import load_trial_histories
    from analysis.validation_report import ValidationContext, write_validation_outputs
    from dkd_tune import tracking
    from dkd_tune.auto_beta import default_calibration, default_calibration_or_none, load_calibration

    name = state["name"]
    search_dir = _finished_search(
        space, folder, f"{name}{SEARCH_SUFFIX}", folder / CONFIG_FILE, run_id, state, options
    )
    search_frame = pd.read_parquet(search_dir / "results.parquet")
    family = _family(search_frame)
    if options.calibration:
        calibration = load_calibration(options.calibration, family)
    else:
        calibration = default_calibration_or_none(family)
    cifar = default_calibration("cifar") if family != "cifar" else None
    teachers = teacher_betas(search_frame, family, calibration=calibration, cifar=cifar)
    pending = betas_to_train(teachers, search_frame)
    state["predictions"] = {
        entry.teacher: {name: p.beta for name, p in entry.predictions.items()} for entry in teachers
    }
    state["trained_betas"] = pending
    atomic_write_json(folder / STATE_FILE, state)
    for entry in teachers:
        made = ", ".join(f"{key} {p.beta:.3g}" for key, p in entry.predictions.items())
        options.log(f"dkd-tune: validate-beta: teacher '{entry.teacher}' gap {entry.gap:.3f}: {made}")

    runs_frame, runs_histories = pd.DataFrame(), pd.DataFrame()
    autobeta_dir = None
    if pending:
        autobeta_path = folder / AUTOBETA_CONFIG_FILE
        atomic_write_text(
            autobeta_path, yaml.safe_dump(autobeta_space(space, name, pending), sort_keys=False)
        )
        autobeta_dir = _finished_search(
            load_search_space(autobeta_path),
            folder,
            f"{name}{AUTOBETA_SUFFIX}",
            autobeta_path,
            run_id,
            state,
            options,
        )
        runs_frame = pd.read_parquet(autobeta_dir / "results.parquet")
        runs_histories = load_trial_histories(autobeta_dir)
    evaluation = evaluation_rows(teachers, search_frame, runs_frame)
    this_session = _session(started, "done")
    context = ValidationContext(
        name=name,
        space=space,
        source=str(state["source"]),
        command=options.command or state.get("command", ""),
        sessions=[*state["sessions"], this_session],
        machine=_machine(),
        load_average=(load_start, os.getloadavg()[0]),
        search_dir=search_dir,
        autobeta_dir=autobeta_dir,
        family=family,
        calibration=calibration,
        cifar=cifar,
    )
    outcome = write_validation_outputs(
        context,
        teachers,
        evaluation,
        search_frame,
        runs_frame,
        load_trial_histories(search_dir),
        runs_histories,
        json.loads((search_dir / "state.json").read_text()),
        folder,
    )
    client = tracking.client_for(state["tracking_uri"])
    tracking.log_metrics(client, run_id, outcome_metrics(evaluation), 0, tracking.now_ms())
    for path in [outcome.report_path, outcome.evaluation_path, outcome.compute_path, *outcome.figures]:
        client.log_artifact(run_id, str(path))
    client.log_artifact(run_id, str(search_dir / "results.parquet"), artifact_path="search")
    if autobeta_dir is not None:
        client.log_artifact(run_id, str(autobeta_dir / "results.parquet"), artifact_path="autobeta")
    client.set_terminated(run_id, status="FINISHED")
    state["status"] = "done"
    state["sessions"].append(this_session)
    atomic_write_json(folder / STATE_FILE, state)
    return outcome


def outcome_metrics(evaluation: pd.DataFrame) -> dict[str, float]:
    """Mean and max regret and mean |log2 error| per trained predictor, for the validation's MLflow run."""
    metrics = {}
    for predictor, rows in evaluation.groupby("predictor"):
        regrets = rows["regret"].dropna()
        if not regrets.empty:
            metrics[f"{predictor}_mean_regret"] = float(regrets.mean())
            metrics[f"{predictor}_max_regret"] = float(regrets.max())
        errors = rows["log2_error"].dropna().abs()
        if not errors.empty:
            metrics[f"{predictor}_mean_abs_log2_error"] = float(errors.mean())
    return metrics


def autobeta_space(space: SearchSpaceFile, name: str, pending: dict[str, list[float]]) -> dict[str, Any]:
    """The search file of the full runs: each teacher's predicted betas as a grid, nothing pruned, no baselines."""
    raw = space.model_dump(mode="json", by_alias=True, exclude_none=True)
    teachers = []
    for teacher in raw["teachers"]:
        label = teacher.get("name") or teacher["model"]
        if label not in pending:
            continue
        own = {key: value for key, value in teacher.get("space", {}).items() if key != "beta"}
        teachers.append({**teacher, "space": {**own, "beta": {"grid": [float(b) for b in pending[label]]}}})
    raw["teachers"] = teachers
    raw["space"] = {key: value for key, value in raw.get("space", {}).items() if key != "beta"}
    raw["baselines"] = []
    raw["search"] = {**raw.get("search", {}), "algorithm": "grid", "num_samples": 1}
    raw["scheduler"] = {**raw.get("scheduler", {}), "type": "none"}
    raw.pop("probe", None)
    raw["description"] = f"Full runs of validation {name!r} at the predicted betas (written by validate-beta)"
    return raw


def _open_state(folder: Path, space: SearchSpaceFile, source: Path, name: str, options) -> dict[str, Any]:
    """The validation's state: created, or read back (resume) after checking it is the same validation."""
    config = yaml.safe_dump(space.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
    state_path = folder / STATE_FILE
    if state_path.is_file():
        stored = load_search_space(folder / CONFIG_FILE).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        if stored != space.model_dump(mode="json", by_alias=True, exclude_none=True):
            raise UserInputError(
                f"{folder}: a validation named {name!r} exists with a different configuration; "
                "pass another --name (or remove that folder to start over)"
            )
        state = json.loads(state_path.read_text())
        if options.tracking_uri:
            state["tracking_uri"] = options.tracking_uri
        options.log(f"dkd-tune: validate-beta: resuming validation '{name}' in {folder}")
        return state
    if folder.exists() and any(folder.iterdir()):
        raise UserInputError(
            f"{folder}: exists and is not a validation folder; pass another --name or --storage"
        )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_FILE, config)
    from dkd_tune.tracking import absolute_tracking_uri

    state = {
        "name": name,
        "source": str(source),
        "command": options.command,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tracking_uri": absolute_tracking_uri(options.tracking_uri or space.tracking_uri),
        "validation_run_id": None,
        "sessions": [],
        "status": "running",
    }
    atomic_write_json(state_path, state)
    options.log(f"dkd-tune: validate-beta: validation '{name}' in {folder}")
    return state


def _validation_run(client, space: SearchSpaceFile, state: dict[str, Any], folder: Path) -> str:
    from dkd_tune import tracking

    run_id = state.get("validation_run_id")
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {
        **tracking.standard_tags("validate-beta"),
        tracking.TAG_SEARCH: state["name"],
        "student": space.student,
        "teachers": ", ".join(teacher.label for teacher in space.teachers),
    }
    run = client.create_run(tracking.experiment_id(client, space.name), run_name=state["name"], tags=tags)
    tracking.log_params(
        client, run.info.run_id, space.model_dump(mode="json", by_alias=True, exclude_none=True)
    )
    client.log_artifact(run.info.run_id, str(folder / CONFIG_FILE))
    state["validation_run_id"] = run.info.run_id
    atomic_write_json(folder / STATE_FILE, state)
    return run.info.run_id


def _finished_search(space, folder: Path, name: str, source: Path, run_id: str, state, options) -> Path:
    """Run the search `name` in `folder`, resume it if it was interrupted, or return it if it is done."""
    from dkd_tune.search import SearchOptions, resume_search, run_search

    search_dir = folder / name
    search_options = SearchOptions(
        name=name,
        storage=str(folder),
        tracking_uri=state["tracking_uri"],
        address=options.address,
        log=options.log,
        parent_run_id=run_id,
    )
    if not (search_dir / "state.json").is_file():
        return run_search(space, source, search_options).experiment_dir
    search_state = json.loads((search_dir / "state.json").read_text())
    stored = load_search_space(search_dir / "search.yaml").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    if stored != space.model_dump(mode="json", by_alias=True, exclude_none=True):
        raise UserInputError(
            f"{search_dir}: holds a search with another configuration than this validation needs; "
            "remove that folder to run it again"
        )
    if search_state.get("status") == "done" and (search_dir / "results.parquet").is_file():
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
