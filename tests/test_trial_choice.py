"""One rule chooses trials and epochs: the validation split when there is one. Every caller is checked on
trials whose validation and test scores disagree, so a caller that ranked on the test split fails here."""

from __future__ import annotations

import pandas as pd

from analysis.best_beta import SELECTION_SCORES, calibration_points_from_results
from analysis.results import results_table
from analysis.trial_choice import best_trial, best_trials_per_teacher, selection_column
from dkd_tune.core.selection import epoch_selection_metric, selection_metric
from dkd_tune.search.transfer_probes import best_trials


def trials() -> pd.DataFrame:
    """Three completed trials per teacher; the best on validation is never the best on test."""
    rows = []
    for teacher, gap in (("t1", 3.0), ("t2", 5.0)):
        for trial, (beta, val, test) in enumerate(((1.0, 70.0, 60.0), (2.0, 60.0, 75.0), (4.0, 65.0, 65.0))):
            rows.append(
                {"search": "s", "part": teacher, "teacher": teacher, "teacher_model": "resnet8", "teacher_gap": gap,
                 "dataset": "synthetic", "dataset_family": "synthetic", "loss": "dkd", "status": "completed",
                 "trial_id": f"{teacher}-{trial}", "stop_epoch": 30, "max_epochs": 30, "beta": beta, "alpha": 1.0,
                 "temperature": 4.0, "warmup_epochs": 5, "final_val_acc": val, "final_test_acc": test,
                 "best_test_acc": test, "final_test_ap": None, "checkpoint_path": f"/ckpt/{teacher}-{trial}"}
            )  # fmt: skip
    rows.append({**rows[1], "part": "baseline-ce", "teacher": "none", "loss": "ce", "trial_id": "ce",
                 "final_val_acc": 99.0, "final_test_acc": 99.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_rule_prefers_validation_and_falls_back_to_test():
    assert selection_metric("classification", True) == "val_acc"
    assert selection_metric("detection", False) == "test_ap"
    assert epoch_selection_metric("classification", True) == "val_acc"
    assert epoch_selection_metric("detection", False) is None  # the last epoch, never the test split's best
    assert SELECTION_SCORES == ("final_val_acc", "final_val_ap", "final_test_acc", "final_test_ap")
    frame = trials()
    assert selection_column(frame) == "final_val_acc"
    assert selection_column(frame.assign(final_val_acc=None)) == "final_test_acc"


def test_the_search_summary_the_registry_and_the_table_choose_on_validation():
    frame = trials()
    assert best_trial(frame)["trial_id"] == "t1-0"  # val 70, test 60; not the baseline (val 99)
    assert best_trials_per_teacher(frame)["trial_id"].tolist() == ["t1-0", "t2-0"]
    table = results_table(frame)
    assert table.splitlines()[2].startswith("| none | ce | ce |")  # the baseline, with no beta/alpha/T...
    assert "|  |  |  |  |" in table.splitlines()[2]
    assert table.index("t1-0") < table.index("t1-2") < table.index("t1-1")  # ...then by validation


def test_the_probes_and_the_calibration_choose_on_validation():
    frame = trials()
    assert best_trials(frame, 2)["trial_id"].tolist() == ["t1-0", "t2-0"]
    points = calibration_points_from_results([frame])
    assert [point.best_beta for point in points] == [1.0, 1.0]
