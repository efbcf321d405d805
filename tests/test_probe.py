"""Linear probe (paper A.7): learns on separable STL-10/Tiny-ImageNet files, once-only features, CLI, MLflow links, search probes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dkd_tune.cli import main
from dkd_tune.config.schema import ProbeConfig
from dkd_tune.data import normalize
from dkd_tune.models import create_model, save_model
from dkd_tune.probe import (
    PAPER_PROTOCOL,
    ProbeProtocol,
    extract_features,
    load_probe_splits,
    load_student,
    probe_checkpoint,
    probe_model,
    train_linear_probe,
)
from tests.probe_datasets import separable_images, write_stl10_split, write_tiny_imagenet

STL_TRAIN_PER_CLASS, STL_TEST_PER_CLASS = 40, 10
TINY_WNIDS = ["n04", "n01", "n03", "n02"]  # unsorted, as the real wnids.txt is
TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS = 10, 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Small STL-10 (10 classes) and Tiny-ImageNet (4 classes) releases whose classes look different."""
    root = tmp_path_factory.mktemp("probe_data")
    for split, per_class, seed in (("train", STL_TRAIN_PER_CLASS, 0), ("test", STL_TEST_PER_CLASS, 1)):
        labels = np.tile(np.arange(10), per_class)
        images = separable_images(labels, 10, 96, seed).transpose(0, 3, 1, 2)  # (N, C, H, W)
        write_stl10_split(root, split, images, labels)
    train_labels = np.tile(np.arange(4), TINY_TRAIN_PER_CLASS)
    val_labels = np.tile(np.arange(4), TINY_VAL_PER_CLASS)
    write_tiny_imagenet(
        root,
        TINY_WNIDS,
        list(zip(train_labels, separable_images(train_labels, 4, 64, 2), strict=True)),
        list(zip(val_labels, separable_images(val_labels, 4, 64, 3), strict=True)),
    )
    return root


@pytest.fixture(scope="module")
def student_path(tmp_path_factory) -> Path:
    """An untrained resnet8 saved as a dkd-tune model checkpoint: random conv features still separate the classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student") / "best.pt"
    model = create_model("resnet8", 100)
    save_model(path, model, arch="resnet8", num_classes=100, dataset="cifar100", input_size=32)
    return path


def blobs(count: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed class centres: linearly separable features."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 1.5
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    return centres[labels] + torch.randn(count, dim, generator=generator), labels


def test_paper_protocol_on_cached_features_learns_with_its_step_schedule():
    train_x, train_y = blobs(600, 5, 16, seed=1)
    test_x, test_y = blobs(200, 5, 16, seed=2)
    result = train_linear_probe(train_x, train_y, test_x, test_y, 5)
    assert result.protocol == PAPER_PROTOCOL == ProbeProtocol(40, 128, 0.1, 10, 0.1, 0.9, 0.0)
    assert [epoch.epoch for epoch in result.history] == list(range(1, 41))
    lrs = [epoch.lr for epoch in result.history]
    for start, expected in ((0, 0.1), (10, 0.01), (20, 0.001), (30, 0.0001)):
        assert all(math.isclose(lr, expected) for lr in lrs[start : start + 10])
    assert result.test_acc > 80.0  # chance is 20%
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert (result.train_acc, result.test_acc) == (result.history[-1].train_acc, result.history[-1].test_acc)
    assert (result.num_train, result.num_test, result.feature_dim, result.num_classes) == (600, 200, 16, 5)


def test_probe_is_deterministic_for_a_seed_and_differs_across_seeds():
    train_x, train_y = blobs(300, 4, 8, seed=3)
    test_x, test_y = blobs(100, 4, 8, seed=4)
    short = {"epochs": 3, "lr_step": 1}
    first = train_linear_probe(train_x, train_y, test_x, test_y, 4, seed=7, **short)
    again = train_linear_probe(train_x, train_y, test_x, test_y, 4, seed=7, **short)
    other = train_linear_probe(train_x, train_y, test_x, test_y, 4, seed=8, **short)
    assert first.history == again.history
    assert [e.train_loss for e in first.history] != [e.train_loss for e in other.history]


@pytest.mark.parametrize(
    ("dataset", "num_train", "num_test", "num_classes"),
    [
        ("stl10", 10 * STL_TRAIN_PER_CLASS, 10 * STL_TEST_PER_CLASS, 10),
        ("tiny-imagenet", 4 * TINY_TRAIN_PER_CLASS, 4 * TINY_VAL_PER_CLASS, 4),
    ],
)
def test_probe_of_a_checkpoint_learns_the_probe_classes(
    data_root, student_path, dataset, num_train, num_test, num_classes
):
    result = probe_checkpoint(student_path, dataset, data_root, device="cpu", progress=False)
    assert (result.num_train, result.num_test, result.num_classes) == (num_train, num_test, num_classes)
    assert (result.arch, result.dataset, result.input_size, result.feature_dim) == (
        "resnet8",
        dataset,
        32,
        64,
    )
    assert len(result.history) == 40
    chance = 100.0 / num_classes
    assert result.test_acc >= chance + 50.0, result.history[-1]
    again = probe_checkpoint(student_path, dataset, data_root, device="cpu", progress=False)
    assert again.history == result.history


def test_features_are_extracted_once_and_equal_the_frozen_backbone_output(data_root, student_path):
    student = load_student(student_path)
    train_set, test_set = load_probe_splits("stl10", data_root, student.input_size)
    assert train_set.image_shape == (3, 32, 32)  # resized from 96x96 to the student's input size
    first_conv = next(m for m in student.model.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []
    first_conv.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))

    probe_model(student.model, train_set, test_set, protocol=PAPER_PROTOCOL)
    # One backbone pass per split for all 40 epochs: every image seen exactly once.
    assert sum(calls) == len(train_set) + len(test_set)

    calls.clear()
    features, labels = extract_features(student.model, train_set, batch_size=32)
    assert len(calls) == math.ceil(len(train_set) / 32)
    assert features.dtype == torch.float32 and features.shape == (len(train_set), 64)
    assert torch.equal(labels, train_set.labels)
    with torch.no_grad():
        direct = student.model.forward_features(normalize(train_set.images, train_set.mean, train_set.std))
    torch.testing.assert_close(features, direct)
    assert not student.model.training


def test_probe_command_json(data_root, student_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    main(
        [
            "probe",
            "--checkpoint",
            str(student_path),
            "--dataset",
            "stl10",
            "--data-root",
            str(data_root),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "stl10" and report["arch"] == "resnet8" and report["mlflow_run_id"] is None
    assert (report["num_train"], report["num_test"], report["feature_dim"]) == (400, 100, 64)
    assert report["protocol"]["epochs"] == 40 and len(report["history"]) == 40
    assert report["test_acc"] >= 60.0  # chance is 10%


def test_probe_command_human_output(data_root, student_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    main(
        [
            "probe",
            "--checkpoint",
            str(student_path),
            "--dataset",
            "tiny-imagenet",
            "--data-root",
            str(data_root),
        ]
    )
    out = capsys.readouterr().out
    assert "on tiny-imagenet at 32x32: 40 train / 16 test images, 4 classes, 64 features" in out
    assert "train top-1" in out and "test top-1" in out and "(40 epochs) on cpu" in out


def test_probe_command_errors(data_root, student_path, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def fails(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["probe", *args])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    common = ["--dataset", "stl10", "--data-root", str(data_root)]
    bare = tmp_path / "bare.pth"
    torch.save(create_model("resnet8", 100).state_dict(), bare)
    assert "does not record its architecture; pass the model name (--model)" in fails(
        "--checkpoint", str(bare), *common
    )
    assert (
        "holds a resnet8 (found by its parameter names and shapes) but the model asked for is wrn_16_2"
        in fails("--checkpoint", str(bare), *common, "--model", "wrn_16_2")
    )
    assert "needs an MLflow store" in fails(
        "--checkpoint", str(student_path), *common, "--parent-run-id", "abc"
    )
    assert "checkpoint file not found" in fails("--checkpoint", str(tmp_path / "none.pt"), *common)
    assert "stl10_binary: no such folder" in fails(
        "--checkpoint", str(student_path), "--dataset", "stl10", "--data-root", str(tmp_path)
    )
    assert "expected cpu, cuda or cuda:N" in fails(
        "--checkpoint", str(student_path), *common, "--device", "gpu0"
    )
    # A foreign file probes once the architecture is named; input size is the architecture's.
    main(["probe", "--checkpoint", str(bare), *common, "--model", "resnet8", "--json"])
    assert json.loads(capsys.readouterr().out)["input_size"] == 32


def test_probe_run_is_nested_under_and_tagged_with_the_student_run(data_root, student_path, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("students")
    student_run = client.create_run(experiment, run_name="student").info.run_id
    client.set_terminated(student_run)

    with pytest.raises(SystemExit):
        main(["probe", "--checkpoint", str(student_path), "--dataset", "stl10", "--data-root", str(data_root),
              "--tracking-uri", uri, "--parent-run-id", "0123456789abcdef"])  # fmt: skip
    assert "no such run in the MLflow store" in capsys.readouterr().err

    main(["probe", "--checkpoint", str(student_path), "--dataset", "stl10", "--data-root", str(data_root),
          "--tracking-uri", uri, "--parent-run-id", student_run, "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    probe_run = client.get_run(report["mlflow_run_id"])
    assert probe_run.info.experiment_id == experiment  # beside its student, where MLflow nests it
    assert probe_run.info.status == "FINISHED"
    tags = probe_run.data.tags
    assert tags["mlflow.parentRunId"] == student_run
    assert tags["dkd_tune.student_run_id"] == student_run
    assert tags["dkd_tune.kind"] == "probe" and tags["dkd_tune.probe_dataset"] == "stl10"
    params = probe_run.data.params
    assert params["protocol.epochs"] == "40" and params["protocol.lr"] == "0.1"
    assert params["protocol.momentum"] == "0.9" and params["protocol.weight_decay"] == "0.0"
    assert params["dataset"] == "stl10" and params["checkpoint"] == str(student_path)
    history = client.get_metric_history(probe_run.info.run_id, "test_acc")
    assert sorted(point.step for point in history) == list(range(1, 41))
    assert len(client.get_metric_history(probe_run.info.run_id, "train_loss")) == 40
    assert probe_run.data.metrics["final_test_acc"] == pytest.approx(report["test_acc"])
    assert client.get_run(student_run).data.metrics["probe_stl10_test_acc"] == pytest.approx(
        report["test_acc"]
    )


# ------------------------------------------------------------------------------------------------
# A search's best trials


def search_results(student_path: Path, tmp_path: Path) -> pd.DataFrame:
    """A results frame as the search writes it: four trials, one stopped by ASHA, one without a usable file."""
    return pd.DataFrame(
        {
            "trial_id": ["t_low", "t_best", "t_stopped", "t_missing", "t_second"],
            "status": ["completed", "completed", "stopped", "completed", "completed"],
            "teacher": ["wrn_40_2"] * 5,
            "final_test_acc": [40.0, 70.0, 90.0, 65.0, 68.0],
            "checkpoint_path": [str(student_path), str(student_path), str(student_path),
                                str(tmp_path / "gone" / "best.pt"), str(student_path)],
        }
    )  # fmt: skip


def trial_runs(client, experiment: str, trial_ids: list[str]) -> dict[str, str]:
    search_run = client.create_run(experiment, run_name="search").info.run_id
    return {
        trial_id: client.create_run(
            experiment,
            run_name=trial_id,
            tags={"mlflow.parentRunId": search_run, "dkd_tune.trial_id": trial_id},
        ).info.run_id
        for trial_id in trial_ids
    }


def test_best_trials_are_probed_inline_and_logged_under_their_trial_runs(data_root, student_path, tmp_path):
    from mlflow.tracking import MlflowClient

    from dkd_tune.search.transfer_probes import PROBE_COLUMNS, probe_best_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("search")
    results = search_results(student_path, tmp_path)
    run_ids = trial_runs(client, experiment, list(results["trial_id"]))
    config = ProbeConfig(datasets=["stl10", "tiny-imagenet"], top_k=3, data_root=str(data_root))
    messages = []

    def probe():
        return probe_best_trials(
            results, config, tracking_uri=uri, experiment_name="search", child_run_ids=run_ids,
            resources={"cpu": 1, "gpu": 0}, run_tasks=False, log=messages.append,
        )  # fmt: skip

    frame = probe()
    assert list(frame.columns) == list(PROBE_COLUMNS)
    # The best three completed trials (the stopped one is skipped despite its accuracy), best first.
    assert list(frame["trial_id"]) == ["t_best", "t_best", "t_second", "t_second", "t_missing", "t_missing"]
    assert list(frame["rank"]) == [1, 1, 2, 2, 3, 3]
    assert list(frame["dataset"]) == ["stl10", "tiny-imagenet"] * 3
    done = frame[frame["status"] == "completed"]
    assert (
        len(done) == 4
        and (done["probe_test_acc"] > done["dataset"].map({"stl10": 60.0, "tiny-imagenet": 75.0})).all()
    )
    missing = frame[frame["trial_id"] == "t_missing"]
    assert (missing["status"] == "errored").all() and missing["error"].str.contains(
        "checkpoint file not found"
    ).all()

    for row in frame.itertuples():
        run = client.get_run(row.probe_run_id)
        assert run.data.tags["mlflow.parentRunId"] == run_ids[row.trial_id] == row.student_run_id
        assert run.data.tags["dkd_tune.student_run_id"] == run_ids[row.trial_id]
        assert run.data.tags["dkd_tune.student_trial_id"] == row.trial_id
        assert run.data.tags["dkd_tune.probe_dataset"] == row.dataset
        assert run.info.status == ("FINISHED" if row.status == "completed" else "FAILED")
        if row.status == "completed":
            assert len(client.get_metric_history(row.probe_run_id, "test_acc")) == 40
            assert run.data.metrics["final_test_acc"] == pytest.approx(row.probe_test_acc)
    trial_metrics = client.get_run(run_ids["t_best"]).data.metrics
    assert set(trial_metrics) >= {"probe_stl10_test_acc", "probe_tiny_imagenet_test_acc"}

    # Probing again (a resumed search) reuses the finished probe runs and retries the failed ones.
    runs_before = len(client.search_runs([experiment], max_results=1000))
    again = probe()
    reused = again[again["status"] == "completed"]
    assert list(reused["probe_run_id"]) == list(done["probe_run_id"])
    assert list(reused["probe_test_acc"]) == list(done["probe_test_acc"])
    assert len(client.search_runs([experiment], max_results=1000)) == runs_before + 2  # the two failed, again


def test_the_probed_trials_are_ranked_on_the_validation_split_when_there_is_one():
    import pandas as pd

    from dkd_tune.search.transfer_probes import best_trials

    frame = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["completed", "completed", "completed", "stopped"],
            "final_test_acc": [70.0, 60.0, 65.0, 90.0],
            "final_val_acc": [55.0, 62.0, 58.0, 99.0],
            "checkpoint_path": ["a.pt", "b.pt", "c.pt", "d.pt"],
        }
    )
    assert list(best_trials(frame, 2)["trial_id"]) == ["b", "c"]
    # Without a validation split the test split is all there is.
    assert list(best_trials(frame.assign(final_val_acc=float("nan")), 2)["trial_id"]) == ["a", "c"]


def test_no_completed_trial_means_no_probe(data_root, student_path, tmp_path):
    from dkd_tune.search.transfer_probes import probe_best_trials

    results = search_results(student_path, tmp_path).assign(status="stopped")
    messages = []
    frame = probe_best_trials(
        results, ProbeConfig(datasets=["stl10"], top_k=3, data_root=str(data_root)), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        experiment_name="search", child_run_ids={}, resources={}, run_tasks=False, log=messages.append,
    )  # fmt: skip
    assert frame.empty and "no completed trial" in messages[0]


@pytest.mark.slow
def test_best_trials_are_probed_as_parallel_ray_tasks(data_root, student_path, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from dkd_tune.search.transfer_probes import probe_best_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("search")
    results = search_results(student_path, tmp_path)
    run_ids = trial_runs(client, experiment, list(results["trial_id"]))
    config = ProbeConfig(datasets=["stl10", "tiny-imagenet"], top_k=2, data_root=str(data_root))
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        frame = probe_best_trials(
            results, config, tracking_uri=uri, experiment_name="search", child_run_ids=run_ids,
            resources={"cpu": 1, "gpu": 0}, log=lambda message: None,
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert list(frame["trial_id"]) == ["t_best", "t_best", "t_second", "t_second"]
    assert (frame["status"] == "completed").all()
    inline = probe_model_results(student_path, data_root)
    for row in frame.itertuples():
        # Same student, data and seed as the in-process probe: the same result, up to float rounding.
        assert row.probe_test_acc == pytest.approx(inline[row.dataset], abs=5.0)
        run = client.get_run(row.probe_run_id)
        assert run.data.tags["mlflow.parentRunId"] == run_ids[row.trial_id]
        assert len(client.get_metric_history(row.probe_run_id, "test_acc")) == 40


def probe_model_results(student_path: Path, data_root: Path) -> dict[str, float]:
    return {
        dataset: probe_checkpoint(student_path, dataset, data_root, device="cpu", progress=False).test_acc
        for dataset in ("stl10", "tiny-imagenet")
    }
