"""The task interface: a trial and a teacher go to their dataset's task, and only the tasks pick a classifier's or a detector's half."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from dkd_tune import tasks
from dkd_tune.data.kinds import DATASET_KINDS
from dkd_tune.trial import run_trial
from tests.test_search_spaces import demo_part

ROOT = Path(__file__).resolve().parents[1]
# The detector's half of each pair; its classifier's half is in the same package.
DETECTION_HALVES = ("engine.detection_loop", "engine.detection_setup", "teacher.detector_preparation")
# Modules that may pick a half: the tasks, and the single commands (train-teacher and distill of one model).
PICKERS = {"dkd_tune/tasks.py", "dkd_tune/commands/single_run.py"}


class RecordingTask:
    def __init__(self, name):
        self.name, self.no_logit_cache, self.runs = name, None, []

    def run_trial(self, run):
        self.runs.append(run)
        return "trained"


def test_every_dataset_kind_names_a_task():
    assert {kind.task for kind in DATASET_KINDS.values()} <= set(tasks.TASKS)


def test_a_trial_is_run_by_its_plans_task_with_its_sampled_values(monkeypatch, tmp_path):
    plan = demo_part(tmp_path)[2]
    assert plan.task == "classification"
    for name in ("classification", "detection"):
        recorder = RecordingTask(name)
        monkeypatch.setitem(tasks.TASKS, name, recorder)
        result = run_trial(
            dataclasses.replace(plan, task=name),
            "data",
            {"beta": 3.5},
            reporter=None,
            checkpoint_dir=tmp_path,
        )
        (run,) = recorder.runs
        assert result == "trained" and run.data == "data" and run.recipe.beta == 3.5
        assert (run.student, run.max_epochs, run.loss_mode) == (plan.student, plan.max_epochs, plan.loss_mode)


def test_the_logit_cache_decision_asks_the_task(monkeypatch, tmp_path):
    from dkd_tune.search.teacher_tasks import cache_decision

    space = demo_part(tmp_path)[0]
    recorder = RecordingTask("classification")
    recorder.no_logit_cache = "off (this task's teacher runs live)"
    monkeypatch.setitem(tasks.TASKS, "classification", recorder)
    assert cache_decision(space, space.data_spec, tmp_path) == (None, "off (this task's teacher runs live)")


def test_only_the_tasks_pick_a_classifier_or_detector_half():
    importing = set()
    for path in ROOT.glob("dkd_tune/**/*.py"):
        text = path.read_text()
        for half in DETECTION_HALVES:
            if re.search(rf"dkd_tune\.{re.escape(half)} import|import dkd_tune\.{re.escape(half)}\b", text):
                importing.add(str(path.relative_to(ROOT)))
    halves = {f"dkd_tune/{half.replace('.', '/')}.py" for half in DETECTION_HALVES}  # one half uses another
    assert importing - halves == PICKERS, importing
