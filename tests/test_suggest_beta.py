"""`dkd-tune suggest-beta` end to end: a teacher trained on the generated dataset, its gap, the distribution over
beta, how far to trust it, and the snippet."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dkd_tune.cli import main
from dkd_tune.data import load_train_test, parse_data_spec
from dkd_tune.data.synthetic import make_synthetic
from dkd_tune.models import load_teacher
from dkd_tune.teacher.auto_beta import CalibrationPoint, fit_calibration, save_calibration
from dkd_tune.teacher.gap import measure_logit_gap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet8 teacher trained for 3 epochs on a small generated dataset with `dkd-tune train-teacher`."""
    folder = tmp_path_factory.mktemp("suggest")
    data = make_synthetic(
        folder / "data", classes=4, superclasses=2, train_per_class=12, test_per_class=4, image_size=16
    )
    spec = f"synthetic:{data}"
    main(
        ["train-teacher", "--model", "resnet8", "--data", spec, "--out", str(folder / "teacher"),
         "--set", "epochs=3", "--set", "batch_size=16", "--device", "cpu"]
    )  # fmt: skip
    checkpoint = folder / "teacher" / "best.pt"
    train_set, test_set = load_train_test(parse_data_spec(spec))
    gap = measure_logit_gap(
        load_teacher("resnet8", checkpoint), train_set, test_set, batch_size=7, progress=False
    )
    # A synthetic-family calibration whose fit gives exactly beta 2 at this teacher's gap.
    calibration = fit_calibration(
        [
            CalibrationPoint("lower", gap.mean - 1.0, 1.0, "test"),
            CalibrationPoint("upper", gap.mean + 1.0, 4.0, "test"),
        ],
        "synthetic",
        "two made-up teachers around the test teacher's gap",
        name="test-synthetic",
    )
    save_calibration(calibration, folder / "calibration.json")
    return {
        "spec": spec,
        "checkpoint": str(checkpoint),
        "calibration": str(folder / "calibration.json"),
        "gap": gap,
        "folder": folder,
    }


def suggest_args(trained, *extra: str) -> list[str]:
    return [
        "suggest-beta",
        "--teacher-model",
        "resnet8",
        "--teacher-checkpoint",
        trained["checkpoint"],
        "--data",
        trained["spec"],
        "--device",
        "cpu",
        *extra,
    ]


def test_suggest_beta_json_on_a_trained_teacher(trained, capsys):
    main(suggest_args(trained, "--calibration", trained["calibration"], "--json"))
    report = json.loads(capsys.readouterr().out)
    gap = trained["gap"]
    assert report["gap"]["mean"] == pytest.approx(gap.mean, abs=1e-9)
    assert report["gap"]["median"] == pytest.approx(gap.median, abs=1e-9)
    assert report["gap"]["std"] == pytest.approx(gap.std, abs=1e-9)
    assert report["gap"]["negative_fraction"] == pytest.approx(gap.negative_fraction)
    assert report["gap"]["num_samples"] == 48 and report["data"]["test_images"] == 16
    assert 0 <= report["gap"]["train_acc"] <= 100 and 0 <= report["gap"]["test_acc"] <= 100
    assert report["beta"] == pytest.approx(2.0, rel=1e-9)
    low, high = report["interval_80"]
    assert low < report["beta"] < high
    # Two points leave no held-out error to measure: the wide default, and it says so.
    assert report["spread_octaves"] == 2.0 and "no held-out error" in report["spread_source"]
    assert "too few to measure" in report["trust"]
    assert report["calibration"] == {
        "name": "test-synthetic",
        "family": "synthetic",
        "provenance": "two made-up teachers around the test teacher's gap",
    }
    assert report["warnings"] == [
        "calibration 'test-synthetic' has no measured held-out error; its spread is a wide default"
    ]
    assert report["extrapolated"] is False
    snippet = yaml.safe_load(report["search_space_yaml"])
    assert snippet == {"space": {"beta": {"loguniform": [0.25, 16], "prior": {"centre": 2.0, "spread": 2.0}}}}
    assert report["mlflow_run_id"] is None


def test_suggest_beta_text_output(trained, capsys):
    main(suggest_args(trained, "--calibration", trained["calibration"]))
    out = capsys.readouterr().out
    gap = trained["gap"]
    assert f"mean {gap.mean:.3f}, median {gap.median:.3f}, std {gap.std:.3f}" in out
    assert f"train {gap.train_acc:.2f}%, test {gap.test_acc:.2f}%" in out
    assert "beta 2 (log2 +1.00 +- 2.00 octaves; 80% interval [" in out
    assert "  spread: no held-out error" in out and "  trust: " in out
    assert "  beta: {loguniform: [0.25, 16], prior: {centre: 2, spread: 2}}" in out


def test_suggest_beta_warns_when_the_gap_is_outside_the_calibration(trained, capsys):
    far = fit_calibration(
        [CalibrationPoint("a", 40.0, 1.0, "test"), CalibrationPoint("b", 50.0, 2.0, "test")],
        "synthetic",
        "far away",
    )
    path = trained["folder"] / "far.json"
    save_calibration(far, path)
    main(suggest_args(trained, "--calibration", str(path), "--json"))
    report = json.loads(capsys.readouterr().out)
    assert report["extrapolated"] is True
    assert any("outside the calibrated range" in warning for warning in report["warnings"])


def test_a_family_without_a_calibration_is_exit_2_and_one_line(trained, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    imagenet = suggest_args(trained)
    imagenet[imagenet.index(trained["spec"])] = f"imagenet:{tmp_path}"
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", *imagenet],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "no default beta calibration for family 'imagenet'" in lines[0]


def test_suggest_beta_works_on_the_demos_data_with_the_shipped_calibration(tmp_path, capsys):
    """The demo's dataset and a resnet8 of the demo's kind: beta, window and the calibration's provenance."""
    from dkd_tune.config.loading import load_search_space
    from dkd_tune.models import create_model

    demo = load_search_space(ROOT / "search_spaces" / "demo.yaml", [f"data.root={tmp_path / 'data'}"])
    make_synthetic(tmp_path / "data", **demo.data.generate)
    checkpoint = tmp_path / "resnet8.pth"
    torch.manual_seed(0)
    torch.save(create_model("resnet8", num_classes=100).state_dict(), checkpoint)  # an untrained teacher
    main(
        ["suggest-beta", "--teacher-model", "resnet8", "--teacher-checkpoint", str(checkpoint),
         "--data", f"synthetic:{tmp_path / 'data'}", "--validation", str(demo.data.validation), "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "auto-beta (calibration 'validate_cnn', family synthetic): beta " in out
    assert "80% interval [" in out and "calibration provenance: Fitted by `dkd-tune validate-beta" in out
    assert "trust: held out (its architecture's other teachers kept" in out  # resnet8 is calibrated
    assert "(5000 training images)" in out  # the demo's 90 per class minus the 40 held out
    # Untrained: its gap is below the calibrated range and it is no better than the student alone.
    assert "outside the calibrated range" in out and "no better than the calibration's student alone" in out


@pytest.mark.slow
def test_suggest_beta_logs_to_mlflow(trained, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(suggest_args(trained, "--calibration", trained["calibration"], "--json", "--tracking-uri", uri))
    report = json.loads(capsys.readouterr().out)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dkd_tune.kind"] == "suggest-beta"
    assert math.isclose(run.data.metrics["gap_mean"], trained["gap"].mean, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(run.data.metrics["beta"], 2.0, rel_tol=1e-9)
    assert run.data.metrics["beta_low"] == report["interval_80"][0]
    assert run.data.params["calibration"] == "test-synthetic"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"search_space_beta.yaml", "suggest_beta.json"} <= artifacts
    snippet = Path(client.download_artifacts(run.info.run_id, "search_space_beta.yaml", str(tmp_path)))
    assert snippet.read_text() == report["search_space_yaml"]
