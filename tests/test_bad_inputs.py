"""Malformed input through the real command line: exit code 2, one line naming what is wrong, nothing started or written.

Every case runs `dkd-tune` in its own process, in a workspace holding the files the cases point at
(a small dataset, good and bad checkpoints, broken dataset folders, interrupted-search folders).
The search-space cases are the files in `tests/bad_inputs/`, each with its expected message on
its first line; the other commands' cases are listed below. For each case the test checks: exit
code 2; stderr is exactly one line, holds the expected text and names the offending file, key or
path; no traceback; the process never imported Ray (so no Ray was started) and no Ray session
folder appeared; and the workspace (search storage, MLflow store, output folders) is unchanged.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dkd_tune.config.loading import load_search_space
from dkd_tune.data import make_synthetic
from dkd_tune.models import create_model, save_model
from dkd_tune.teacher.auto_beta import CalibrationPoint, fit_calibration, save_calibration
from tests.damaged_files import flip_tensor_byte
from tests.probe_datasets import write_stl10_split

ROOT = Path(__file__).resolve().parents[1]
BAD_INPUTS = Path(__file__).resolve().parent / "bad_inputs"
VALID = BAD_INPUTS / "valid.yaml"
WRAPPER = Path(__file__).resolve().parent / "cli_with_import_report.py"
pytestmark = pytest.mark.slow

# Created only if a case wrongly ran the code hidden in malicious.pt.
MALICIOUS_MARKER = "malicious-code-ran"


class MaliciousPayload:
    """Unpickling this calls os.system: what a checkpoint loaded with weights_only=False would run."""

    def __reduce__(self):
        return (os.system, (f"touch {MALICIOUS_MARKER}",))


# ------------------------------------------------------------------------------------------------
# The workspace


def _write_search_folder(folder: Path, state: bytes | None, config_text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "search.yaml").write_text(config_text)
    if state is not None:
        (folder / "state.json").write_bytes(state)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    make_synthetic(
        root / "data", classes=5, superclasses=5, train_per_class=8, test_per_class=4, image_size=8
    )
    for name, arch, classes in [
        ("teacher_resnet8.pt", "resnet8", 5),
        ("teacher_resnet20.pt", "resnet20", 5),
        ("teacher_resnet8_10_classes.pt", "resnet8", 10),
    ]:
        model = create_model(arch, num_classes=classes)
        save_model(root / name, model, arch=arch, num_classes=classes, dataset="synthetic", input_size=8)
    good = (root / "teacher_resnet8.pt").read_bytes()
    flip_tensor_byte(root / "teacher_resnet8.pt", root / "corrupted.pt")
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "empty.pt").write_bytes(b"")
    torch.save(
        {"model": create_model("resnet8", 5).state_dict(), "hook": MaliciousPayload()}, root / "malicious.pt"
    )
    torch.save([torch.zeros(3), torch.ones(3)], root / "list_of_tensors.pt")

    # Dataset folders: one file missing, one file of garbage, one pickle of the wrong content.
    shutil.copytree(root / "data", root / "data_without_meta")
    (root / "data_without_meta" / "cifar-100-python" / "meta").unlink()
    (root / "data_without_meta" / "synthetic.json").unlink(missing_ok=True)
    shutil.copytree(root / "data", root / "data_with_garbage")
    (root / "data_with_garbage" / "cifar-100-python" / "train").write_bytes(os.urandom(4096))
    shutil.copytree(root / "data", root / "data_with_wrong_pickle")
    with open(root / "data_with_wrong_pickle" / "cifar-100-python" / "train", "wb") as file:
        pickle.dump({b"images": np.zeros(3)}, file)
    for folder in ("data_with_garbage", "data_with_wrong_pickle"):
        (root / folder / "synthetic.json").unlink(
            missing_ok=True
        )  # not a complete generated dataset any more
    images = np.zeros((4, 3, 96, 96), dtype=np.uint8)
    write_stl10_split(root / "stl_without_test", "train", images, np.arange(4) % 2)

    # Searches to resume: a state file cut mid-write, one that is not a state file, an edited config.
    config_text = VALID.read_text()
    runs = root / "runs"
    _write_search_folder(runs / "corrupted-state", b'{"name": "corrupted-state", "tracking', config_text)
    _write_search_folder(runs / "foreign-state", b'["not", "a", "state"]', config_text)
    state = {"name": "edited", "tracking_uri": "sqlite:///x.db", "teachers": {}, "parts_done": []}
    _write_search_folder(runs / "edited-config", json.dumps(state).encode(), config_text + "studnet: x\n")
    _write_search_folder(runs / "state-not-utf8", b'{"name": "caf\xe9"}', config_text)

    (root / "results.parquet").write_text("trial_id,status\nabc,completed\n")
    (root / "empty.parquet").write_bytes(b"")
    (root / "calibration.json").write_text("{not json")
    points = [CalibrationPoint("low", 1.0, 1.0, "made up"), CalibrationPoint("high", 5.0, 4.0, "made up")]
    save_calibration(fit_calibration(points, "synthetic", "made up"), root / "synthetic_calibration.json")
    (root / "calibration_not_utf8.json").write_bytes(b'{"name": "\xff\xfe"}')
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time."""
    found = {}
    for path in folder.rglob("*"):
        stat = path.stat()
        found[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return found


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    imported: dict[str, bool]


def run_cli(workspace: Path, args: list[str]) -> Outcome:
    report = workspace.parent / "imports.json"
    report.unlink(missing_ok=True)
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DKD_TEST_IMPORT_REPORT": str(report),
        "RAY_TMPDIR": str(workspace.parent / "ray-tmp"),  # where a Ray session would leave its folder
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'environment-mlflow.db'}",
    }
    result = subprocess.run(
        [sys.executable, str(WRAPPER), *args],
        cwd=workspace,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported = json.loads(report.read_text()) if report.exists() else {}
    return Outcome(result.returncode, result.stdout, result.stderr, imported)


def check_refused(workspace: Path, args: list[str], expected: list[str]) -> str:
    """Run a case and check everything the suite promises; returns the error line."""
    before = snapshot(workspace)
    outcome = run_cli(workspace, args)
    shown = f"args {args}\nstdout:\n{outcome.stdout[-2000:]}\nstderr:\n{outcome.stderr[-4000:]}"
    assert outcome.returncode == 2, shown
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    assert "Traceback" not in line and outcome.stdout == "", shown
    for text in expected:
        assert text in line, f"expected {text!r} in the error line\n{shown}"
    assert outcome.imported.get("ray") is False, f"Ray was imported\n{shown}"
    assert not (workspace.parent / "ray-tmp").exists(), "a Ray session folder appeared"
    assert snapshot(workspace) == before, f"the workspace changed\n{shown}"
    return line


# ------------------------------------------------------------------------------------------------
# Search-space files


def yaml_cases() -> list[Path]:
    return sorted(path for path in BAD_INPUTS.glob("*.yaml") if path != VALID)


def expected_message(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")
    return first.removeprefix("# expect:").strip() if first.startswith("# expect:") else ""


def test_the_files_are_one_mistake_away_from_a_valid_search(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    assert load_search_space(VALID).teachers[0].checkpoint == "teacher_resnet8.pt"
    assert len(yaml_cases()) >= 30


@pytest.mark.parametrize("path", yaml_cases(), ids=lambda path: path.stem)
def test_run_refuses_a_bad_search_file(workspace, path):
    expected = expected_message(path) or "file is empty"
    check_refused(workspace, ["run", str(path)], [f"{path}: ", expected])


# ------------------------------------------------------------------------------------------------
# Every other command that reads a user's files or values

DISTILL = ["distill", "--teacher-model", "resnet8", "--student", "resnet8", "--data", "synthetic:data"]
DISTILL_OUT = ["--out", "distilled", "--tracking-uri", "sqlite:///distill-mlflow.db"]
TRAIN = ["train-teacher", "--model", "resnet8", "--out", "teacher_out"]
SUGGEST = ["suggest-beta", "--teacher-model", "resnet8", "--data", "synthetic:data"]
SUGGEST_CALIBRATED = [*SUGGEST, "--calibration", "synthetic_calibration.json"]
PROBE = ["probe", "--dataset", "stl10", "--data-root", "stl_without_test"]

COMMAND_CASES = {
    "run-missing-file": (["run", "no_such.yaml"], ["no_such.yaml: file not found"]),
    "run-a-folder": (["run", "data"], ["'data'", "is a directory"]),
    "run-set-without-value": (["run", str(VALID), "--set", "epochs"], ["--set 'epochs': expected KEY=VALUE"]),
    "run-set-misspelt-key": (["run", str(VALID), "--set", "search.seeed=3"], ["did you mean 'seed'"]),
    "run-set-bad-yaml": (
        ["run", str(VALID), "--set", "epochs=[1"],
        ["--set epochs: value '[1' is not valid YAML"],
    ),
    "run-num-samples-zero": (["run", str(VALID), "--num-samples", "0"], ["search.num_samples = 0"]),
    "run-num-samples-text": (["run", str(VALID), "--num-samples", "many"], ["--num-samples", "'many'"]),
    "run-tracking-uri-of-unknown-scheme": (
        ["run", str(VALID), "--tracking-uri", "sqlite3:///mlflow.db"],
        ["--tracking-uri 'sqlite3:///mlflow.db': unknown scheme 'sqlite3'"],
    ),
    "run-storage-is-a-file": (
        ["run", str(VALID), "--storage", "empty.pt"],
        ["--storage 'empty.pt': empty.pt is a file"],
    ),
    "resume-unknown-search": (["resume", "nothing", "--storage", "runs"], ["search 'nothing': not found"]),
    "resume-cut-state-file": (
        ["resume", "runs/corrupted-state"],
        ["corrupted-state/state.json: cannot read"],
    ),
    "resume-foreign-state-file": (
        ["resume", "runs/foreign-state"],
        ["foreign-state/state.json: not a search state"],
    ),
    "resume-state-not-utf8": (["resume", "runs/state-not-utf8"], ["state-not-utf8/state.json: cannot read"]),
    "resume-edited-config": (
        ["resume", "runs/edited-config"],
        ["edited-config/search.yaml: studnet: unknown key"],
    ),
    "distill-teacher-of-another-architecture": (
        [*DISTILL, "--teacher-checkpoint", "teacher_resnet20.pt", *DISTILL_OUT],
        ["teacher_resnet20.pt holds a resnet20"],
    ),
    "distill-teacher-of-another-class-count": (
        [*DISTILL, "--teacher-checkpoint", "teacher_resnet8_10_classes.pt", *DISTILL_OUT],
        ["teacher_resnet8_10_classes.pt (resnet8) has 10 classes but 5 were expected"],
    ),
    "distill-malicious-teacher": (
        [*DISTILL, "--teacher-checkpoint", "malicious.pt", *DISTILL_OUT],
        ["malicious.pt: cannot read checkpoint", "weights_only=True"],
    ),
    "distill-missing-teacher": (
        [*DISTILL, "--teacher-checkpoint", "gone.pt", *DISTILL_OUT],
        ["gone.pt: checkpoint file not found"],
    ),
    "distill-set-out-of-range": (
        [*DISTILL, "--teacher-checkpoint", "teacher_resnet8.pt", *DISTILL_OUT, "--set", "epochs=-1"],
        ["epochs = -1 is not valid"],
    ),
    "distill-set-misspelt-field": (
        [*DISTILL, "--teacher-checkpoint", "teacher_resnet8.pt", *DISTILL_OUT, "--set", "epoch=3"],
        ["'epoch'", "epochs"],
    ),
    "distill-unknown-student": (
        [
            "distill",
            "--teacher-model",
            "resnet8",
            "--teacher-checkpoint",
            "teacher_resnet8.pt",
            "--student",
            "resnet9",
            "--data",
            "synthetic:data",
            *DISTILL_OUT,
        ],
        ["resnet9"],
    ),
    "distill-data-without-root": (
        [
            "distill",
            "--teacher-model",
            "resnet8",
            "--teacher-checkpoint",
            "teacher_resnet8.pt",
            "--student",
            "resnet8",
            "--data",
            "synthetic",
            *DISTILL_OUT,
        ],
        ["--data"],
    ),
    "distill-unknown-device": (
        [*DISTILL, "--teacher-checkpoint", "teacher_resnet8.pt", *DISTILL_OUT, "--device", "tpu:7"],
        ["--device 'tpu:7'"],
    ),
    "distill-tracking-uri-of-unknown-scheme": (
        [
            *DISTILL,
            "--teacher-checkpoint",
            "teacher_resnet8.pt",
            "--out",
            "distilled",
            "--tracking-uri",
            "mlflow://x",
        ],
        ["--tracking-uri 'mlflow://x': unknown scheme 'mlflow'"],
    ),
    "train-teacher-unknown-recipe": (
        [*TRAIN, "--data", "synthetic:data", "--recipe", "imagenet1k"],
        ["imagenet1k"],
    ),
    "train-teacher-dataset-with-garbage": (
        [*TRAIN, "--data", "synthetic:data_with_garbage"],
        ["data_with_garbage/cifar-100-python/train"],
    ),
    "train-teacher-dataset-of-wrong-content": (
        [*TRAIN, "--data", "synthetic:data_with_wrong_pickle"],
        ["data_with_wrong_pickle/cifar-100-python/train"],
    ),
    "train-teacher-dataset-missing-file": (
        [*TRAIN, "--data", "synthetic:data_without_meta"],
        ["data_without_meta/cifar-100-python/meta"],
    ),
    "suggest-beta-other-class-count": (
        [*SUGGEST_CALIBRATED, "--teacher-checkpoint", "teacher_resnet8_10_classes.pt"],
        ["teacher_resnet8_10_classes.pt (resnet8) has 10 classes but 5 were expected"],
    ),
    "suggest-beta-corrupted-checkpoint": (
        [*SUGGEST_CALIBRATED, "--teacher-checkpoint", "corrupted.pt"],
        ["corrupted.pt: checkpoint content does not match its SHA-256"],
    ),
    "suggest-beta-truncated-checkpoint": (
        [*SUGGEST_CALIBRATED, "--teacher-checkpoint", "truncated.pt"],
        ["truncated.pt: cannot read checkpoint"],
    ),
    "suggest-beta-calibration-not-json": (
        [*SUGGEST, "--teacher-checkpoint", "teacher_resnet8.pt", "--calibration", "calibration.json"],
        ["calibration.json"],
    ),
    "probe-dataset-missing-file": (
        [*PROBE, "--checkpoint", "teacher_resnet8.pt"],
        ["stl_without_test/stl10_binary/test_X.bin: missing file"],
    ),
    "probe-malicious-checkpoint": (
        [*PROBE, "--checkpoint", "malicious.pt"],
        ["malicious.pt: cannot read checkpoint", "weights_only=True"],
    ),
    "probe-tracking-uri-of-unknown-scheme": (
        [*PROBE, "--checkpoint", "teacher_resnet8.pt", "--tracking-uri", "ftp://host/mlruns"],
        ["--tracking-uri 'ftp://host/mlruns': unknown scheme 'ftp'"],
    ),
    "probe-empty-checkpoint": ([*PROBE, "--checkpoint", "empty.pt"], ["empty.pt: cannot read checkpoint"]),
    "calibrate-text-as-parquet": (
        ["calibrate", "results.parquet", "--out", "calibration-out.json"],
        ["results.parquet"],
    ),
    "calibrate-empty-file": (
        ["calibrate", "empty.parquet", "--out", "calibration-out.json"],
        ["empty.parquet"],
    ),
    "show-calibration-not-utf8": (
        ["show-calibration", "calibration_not_utf8.json"],
        ["calibration_not_utf8.json"],
    ),
    "models-unknown-family": (["models", "--family", "mnist"], ["--family", "'mnist'"]),
    "make-synthetic-no-classes": (
        ["make-synthetic", "--out", "synthetic_out", "--classes", "0"],
        ["classes"],
    ),
    "make-synthetic-more-groups-than-classes": (
        ["make-synthetic", "--out", "synthetic_out", "--classes", "10", "--superclasses", "50"],
        ["superclasses"],
    ),
    "make-synthetic-out-is-a-file": (["make-synthetic", "--out", "empty.pt"], ["'empty.pt'", "is a file"]),
    "ui-port-out-of-range": (["ui", "--port", "70000"], ["--port", "70000"]),
    "ui-port-not-a-number": (["ui", "--port", "http"], ["--port", "'http'"]),
    "ui-host-like-an-option": (["ui", "--host", "--dev"], ["--host '--dev'"]),
    "ui-tracking-server": (["ui", "--tracking-uri", "http://127.0.0.1:5000"], ["http://127.0.0.1:5000"]),
}


@pytest.mark.parametrize("case", list(COMMAND_CASES), ids=str)
def test_command_refuses_bad_input(workspace, case):
    args, expected = COMMAND_CASES[case]
    check_refused(workspace, args, expected)


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(workspace, tmp_path):
    """The control for the cases above: loaded without weights_only, the file runs its command."""
    shutil.copy(workspace / "malicious.pt", tmp_path / "malicious.pt")
    code = (
        "import torch; torch.load('malicious.pt', weights_only=False)"  # the unsafe load dkd-tune never does
    )
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=300,
    )
    assert (tmp_path / MALICIOUS_MARKER).exists()
    assert not (workspace / MALICIOUS_MARKER).exists()


def test_the_suite_covers_every_command_that_reads_user_input():
    commands = {args[0] for args, _ in COMMAND_CASES.values()}
    assert {
        "run", "resume", "distill", "train-teacher", "suggest-beta", "probe",
        "calibrate", "show-calibration", "models", "make-synthetic", "ui",
    } <= commands  # fmt: skip
    assert len(yaml_cases()) + len(COMMAND_CASES) >= 80
