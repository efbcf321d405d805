"""The state files of a search and of a validation: typed, versioned, read back as written, older ones read."""

from __future__ import annotations

import json

import pytest

from dkd_tune.config.search_state import STATE_VERSION, SearchState, ValidationState
from dkd_tune.core.errors import UserInputError
from dkd_tune.teacher.gap import LogitGapStats
from dkd_tune.teacher.preparation import TeacherArtifacts


def a_teacher() -> TeacherArtifacts:
    gap = LogitGapStats(4.2, 4.0, 1.0, 0.05, 90.0, 70.0, 100)
    return TeacherArtifacts("t", "resnet8", "/ckpt/t.pth", 100, gap, "/cache/t", predicted_beta=2.0)


def test_a_search_state_reads_back_as_written(tmp_path):
    state = SearchState.new("demo", "search_spaces/demo.yaml", "sqlite:////tmp/mlflow.db")
    state.teachers["t"] = a_teacher()
    state.parts_done.append("baseline-ce")
    state.parent_run_id, state.status, state.tracking, state.probes_done = "abc", "done", "synced", True
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    state.save(tmp_path / "first")
    written = (tmp_path / "first" / "state.json").read_text()
    assert json.loads(written)["version"] == STATE_VERSION
    again = SearchState.load(tmp_path / "first")
    assert again.teachers["t"].gap.mean == 4.2 and again.parts_done == ["baseline-ce"]
    again.save(
        tmp_path / "second"
    )  # the gap's unmeasured fields are NaN, which no `==` equals: compare files
    assert (tmp_path / "second" / "state.json").read_text() == written


def test_a_state_written_before_versions_is_read(tmp_path):
    # What dkd-tune wrote before the typed state: the same keys, no `version`, teachers as dicts.
    record = {
        "name": "old",
        "source": "old.yaml",
        "created": "2026-11-01 10:00:00",
        "tracking_uri": "sqlite:////tmp/mlflow.db",
        "teachers": {"t": a_teacher().to_dict()},
        "parts_done": ["t"],
        "parent_run_id": None,
        "status": "interrupted",
    }
    (tmp_path / "state.json").write_text(json.dumps(record))
    state = SearchState.load(tmp_path)
    assert state.teachers["t"].to_dict().keys() == a_teacher().to_dict().keys()
    assert state.teachers["t"].predicted_beta == 2.0
    assert (state.status, state.tracking, state.probes_done) == ("interrupted", None, False)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"version": STATE_VERSION + 1}, f"version {STATE_VERSION + 1}: written by a newer dkd-tune"),
        ({"status": "paused"}, "status 'paused': expected one of 'running', 'interrupted', 'done'"),
        ({"tracking": "maybe"}, "tracking 'maybe': expected one of 'synced', 'pending', None"),
        ({"teachers": {"t": {"label": "t"}}}, "not a search state file (unreadable entry"),
    ],
)
def test_a_state_dkd_tune_cannot_use_is_one_line_naming_the_file_and_key(tmp_path, change, expected):
    SearchState.new("demo", "demo.yaml", "sqlite:////tmp/mlflow.db").save(tmp_path)
    record = json.loads((tmp_path / "state.json").read_text()) | change
    (tmp_path / "state.json").write_text(json.dumps(record))
    with pytest.raises(UserInputError) as error:
        SearchState.load(tmp_path)
    assert str(error.value).startswith(str(tmp_path / "state.json"))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_a_validation_state_reads_back_as_written(tmp_path):
    state = ValidationState.new(
        "v", "validate.yaml", "dkd-tune validate-beta validate.yaml", "sqlite:////x.db"
    )
    state.sessions.append({"started": "2026-12-05 01:00:00", "seconds": 3.0, "outcome": "done"})
    state.validation_run_id, state.status = "run", "done"
    state.save(tmp_path)
    assert ValidationState.load(tmp_path) == state
    assert json.loads((tmp_path / "validation.json").read_text())["version"] == STATE_VERSION
