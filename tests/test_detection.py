"""Detection (A.6): COCO-format data, Faster R-CNN detectors, DKD on the R-CNN head over the student's proposals, COCO AP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.losses import dkd_loss
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.data.coco import collate_detections, load_coco
from dkd_tune.data.synthetic_coco import CATEGORY_IDS, make_synthetic_coco
from dkd_tune.engine.checkpoints import save_best_model
from dkd_tune.engine.detection_eval import score_detections
from dkd_tune.engine.detection_loop import StudentForward, detection_step, fit_detector
from dkd_tune.engine.detection_setup import prepare_detection_run
from dkd_tune.engine.run_setup import RunIdentity
from dkd_tune.models.checkpoints import ArchitectureMismatchError
from dkd_tune.models.detection import create_detector, load_detector, matching_detector_state_dict
from dkd_tune.teacher.detection_gap import measure_detection_gap


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), train_images=120, val_images=40, seed=3)


@pytest.fixture(scope="module")
def coco(coco_root):
    return load_coco(coco_root, name="synthetic-coco", validation=20, augment="standard")


def copy_of(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def a_batch(coco, count: int = 2):
    dataset = coco.dataset("train", train=False)
    return collate_detections([dataset[i] for i in range(count)])


# ------------------------------------------------------------------------------------------------
# The generated dataset and the reader


def test_generated_dataset_is_coco_format_with_sibling_categories(coco_root, coco):
    instances = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in instances["categories"]] == list(CATEGORY_IDS)
    shapes = [c["supercategory"] for c in instances["categories"]]
    assert all(shapes.count(shape) == 2 for shape in shapes)  # three look-alike pairs
    assert len(instances["images"]) == 120 and len(instances["annotations"]) >= 120
    # The reader maps category ids with gaps to labels 1..6 (0 is the background).
    assert coco.num_classes == 7 and len(coco.validation_ids) == 20
    image, target = coco.dataset("train", train=False)[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert target["labels"].min() >= 1 and target["labels"].max() <= 6
    first = instances["annotations"][0]
    x, y, w, h = first["bbox"]
    row = coco.dataset("train", train=False).source.ids.index(first["image_id"])
    boxes = coco.dataset("train", train=False)[row][1]["boxes"]
    assert [x, y, x + w, y + h] in boxes.tolist()
    assert set(coco.validation_ids).isdisjoint(coco.image_ids("train"))


def test_missing_annotations_mismatched_images_and_categories_are_one_line_errors(coco_root, tmp_path):
    missing = copy_of(coco_root, tmp_path / "a")
    (missing / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(UserInputError, match=r"instances_val2017.json: annotation file not found"):
        load_coco(missing, name="coco", validation=0, augment="standard")

    no_image = copy_of(coco_root, tmp_path / "b")
    (no_image / "train2017" / "000000000005.png").unlink()
    with pytest.raises(UserInputError, match=r"image 5 is '000000000005.png', which is not in"):
        load_coco(no_image, name="coco", validation=0, augment="standard")

    resized = copy_of(coco_root, tmp_path / "c")
    path = resized / "annotations" / "instances_train2017.json"
    instances = json.loads(path.read_text())
    instances["images"][0]["width"] = 640
    path.write_text(json.dumps(instances))
    with pytest.raises(UserInputError, match=r"is 64x64 pixels, the annotations say 640x64"):
        load_coco(resized, name="coco", validation=0, augment="standard")

    other = copy_of(coco_root, tmp_path / "d")
    path = other / "annotations" / "instances_val2017.json"
    instances = json.loads(path.read_text())
    instances["categories"][0]["name"] = "circle"
    path.write_text(json.dumps(instances))
    with pytest.raises(
        UserInputError, match=r"its categories differ from those of .*instances_train2017.json"
    ):
        load_coco(other, name="coco", validation=0, augment="standard")
    for error in ("annotation file not found", "not in", "annotations say", "categories differ"):
        assert "\n" not in error


def test_wrong_architecture_and_other_categories_in_a_checkpoint_are_named(coco, tmp_path):
    tiny = create_detector("frcnn_tiny", coco.num_classes)
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)  # a bare state dict: the architecture is found by its shapes
    with pytest.raises(
        ArchitectureMismatchError, match=r"holds a frcnn_tiny, but the detector asked for is frcnn_small"
    ):
        matching_detector_state_dict("frcnn_small", path, coco.category_names)
    identity = RunIdentity("frcnn_tiny", coco.num_classes, categories=("a", "b", "c", "d", "e", "f"))
    recorded = tmp_path / "recorded.pt"
    save_best_model(recorded, tiny, identity, resolve_recipe("coco-1x"), {})
    with pytest.raises(
        UserInputError, match=r"trained on the categories a, b, c, d, e, f; the data's are square-across"
    ):
        load_detector("frcnn_tiny", recorded, categories=coco.category_names)
    with pytest.raises(ArchitectureMismatchError, match=r"recorded in the file"):
        load_detector("frcnn_small", recorded, categories=coco.category_names)
    loaded = load_detector("frcnn_tiny", path, categories=coco.category_names)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_coco_metrics_come_from_cocoeval(coco):
    ground_truth = coco.ground_truth("test")
    ids = coco.image_ids("test", ground_truth)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in ground_truth.dataset["annotations"]
    ]
    scores = score_detections(ground_truth, perfect, ids)
    assert scores["ap"] == pytest.approx(100.0) and scores["ap50"] == pytest.approx(100.0)
    assert "apl" not in scores  # no large objects in 64-pixel images: COCOeval's -1 is not reported
    assert score_detections(ground_truth, [], ids) == dict.fromkeys(
        ("ap", "ap50", "ap75", "aps", "apm", "apl"), 0.0
    )
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] * 0.6, *d["bbox"][1:]]} for d in perfect]
    assert score_detections(ground_truth, shifted, ids)["ap"] < 5.0


# ------------------------------------------------------------------------------------------------
# The DKD step on the R-CNN head


def test_a_detection_dkd_step_equals_the_hand_computed_reference_on_the_same_proposals(coco):
    torch.manual_seed(0)
    student = create_detector("frcnn_tiny", coco.num_classes).train()
    teacher = create_detector("frcnn_small", coco.num_classes).eval()
    # The teacher resizes its inputs to 96 pixels: the student's proposals must be rescaled to its images.
    teacher.transform.min_size, teacher.transform.max_size = (96,), 96
    recipe = resolve_recipe("coco-1x", overrides={"beta": 2.0, "alpha": 0.5, "temperature": 2.0})
    images, targets = a_batch(coco)

    seen: dict[str, list] = {
        "student_boxes": [],
        "teacher_boxes": [],
        "student_logits": [],
        "teacher_logits": [],
    }
    hooks = [
        student.roi_heads.box_roi_pool.register_forward_hook(
            lambda m, a, o: seen["student_boxes"].append(a[1])
        ),
        teacher.roi_heads.box_roi_pool.register_forward_hook(
            lambda m, a, o: seen["teacher_boxes"].append(a[1])
        ),
        student.roi_heads.box_predictor.register_forward_hook(
            lambda m, a, o: seen["student_logits"].append(o[0])
        ),
        teacher.roi_heads.box_predictor.register_forward_hook(
            lambda m, a, o: seen["teacher_logits"].append(o[0])
        ),
    ]
    torch.manual_seed(1)
    total, parts = detection_step(
        StudentForward(student), teacher, images, targets, "dkd", recipe, warmup=1.0
    )
    for hook in hooks:
        hook.remove()

    student_boxes, teacher_boxes = seen["student_boxes"][0], seen["teacher_boxes"][0]
    for mine, theirs in zip(student_boxes, teacher_boxes, strict=True):
        assert torch.allclose(theirs, mine * 1.5)  # the same proposals, in the teacher's 96-pixel frame
    # Labels by hand: the class of the ground-truth box overlapped most at IoU >= 0.5, else background (0).
    labels = []
    for boxes, target in zip(student_boxes, targets, strict=True):
        iou = box_iou(boxes, target["boxes"])
        best, index = iou.max(dim=1)
        labels.append(torch.where(best >= 0.5, target["labels"][index], torch.zeros_like(index)))
    labels = torch.cat(labels)
    assert (labels > 0).any() and (labels == 0).any()
    student_logits, teacher_logits = seen["student_logits"][0], seen["teacher_logits"][0]
    assert student_logits.shape == teacher_logits.shape == (len(labels), coco.num_classes)
    reference = dkd_loss(
        student_logits, teacher_logits, labels, alpha=0.5, beta=2.0, temperature=2.0, return_components=True
    )
    detector_losses = sum(
        parts[name] for name in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
    )
    assert torch.allclose(total, detector_losses + reference.total, atol=1e-6)
    assert torch.allclose(parts["tckd"], reference.tckd) and torch.allclose(parts["nckd"], reference.nckd)
    # The teacher gets no gradient; the student's head does, through the distillation term.
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.roi_heads.box_predictor.cls_score.weight.grad is not None


def test_loss_modes_weigh_the_terms_on_the_head(coco):
    torch.manual_seed(0)
    student = create_detector("frcnn_tiny", coco.num_classes).train()
    teacher = create_detector("frcnn_tiny", coco.num_classes).eval()
    recipe = resolve_recipe("coco-1x", overrides={"beta": 3.0, "alpha": 0.0})
    images, targets = a_batch(coco)
    totals = {}
    for mode in ("ce", "dkd", "nckd"):
        torch.manual_seed(5)
        totals[mode], parts = detection_step(
            StudentForward(student), teacher, images, targets, mode, recipe, 1.0
        )
    # alpha 0: DKD is beta * NCKD, which NCKD mode is too; CE mode is the detector's losses alone.
    assert torch.allclose(totals["dkd"], totals["nckd"])
    assert torch.allclose(totals["dkd"] - totals["ce"], 3.0 * parts["nckd"], atol=1e-6)


def test_a_few_epochs_of_distillation_improve_ap_over_the_start(tmp_path_factory, tmp_path):
    # 300 images and 4 epochs (~140 steps): measured AP50 6.2-6.8 at the end under 1 and 2 threads,
    # from 0.0; fewer steps (3 epochs of 100 images) left it between 0.4 and 3, too close to the start.
    root = make_synthetic_coco(tmp_path_factory.mktemp("coco300"), train_images=300, val_images=40, seed=3)
    coco = load_coco(root, name="synthetic-coco", validation=20, augment="standard")
    torch.manual_seed(0)
    recipe = resolve_recipe(
        "coco-1x", overrides={"epochs": 4, "lr_milestones": [], "batch_size": 8, "warmup_epochs": 0}
    )
    teacher = create_detector("frcnn_small", coco.num_classes)
    run = prepare_detection_run("frcnn_tiny", coco, recipe)
    start = run.evaluations["test"].score(run.model, torch.device("cpu"))["ap50"]
    result = fit_detector(
        run.model, run.train_loader, run.evaluations, recipe, identity=run.identity, loss_mode="dkd",
        teacher=teacher, checkpoint_dir=tmp_path,
    )  # fmt: skip
    assert result.status == "completed" and result.epochs_completed == 4
    last = result.history[-1]
    assert {"val_ap", "test_ap", "test_ap50", "train_tckd", "train_nckd", "train_loss_classifier"} <= set(
        last
    )
    assert last["test_ap50"] > start + 3.0, (start, [h["test_ap50"] for h in result.history])
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()


def test_the_teacher_gap_is_measured_on_its_head_over_assigned_proposals(coco):
    torch.manual_seed(0)
    teacher = create_detector("frcnn_tiny", coco.num_classes)
    gap = measure_detection_gap(teacher, coco, max_images=16)
    assert gap.num_samples > 0 and gap.background_samples > gap.num_samples
    assert gap.background_mean == gap.background_mean  # not NaN
    assert 0.0 <= gap.negative_fraction <= 1.0 and 0.0 <= gap.train_acc <= 100.0
    restored = type(gap).from_dict(json.loads(json.dumps(gap.to_dict())))
    assert restored == gap


# ------------------------------------------------------------------------------------------------
# The search: `dkd-tune run` on a detection file


def detection_space(tmp_path: Path, **changes) -> Path:
    """search_spaces/detection_demo.yaml, shrunk to seconds per trial."""
    import yaml

    space = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "search_spaces" / "detection_demo.yaml").read_text()
    )
    space["data"].update(
        root=str(tmp_path / "data"), validation=10, generate={"train_images": 60, "val_images": 20, "seed": 1}
    )
    space["overrides"].update(epochs=2, lr_milestones=[1])
    space["teachers"][0]["train"]["overrides"].update(epochs=2, lr_milestones=[1])
    space["search"].update(num_samples=2)
    space["scheduler"].update(grace_period=1)
    space.update(
        storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **changes
    )
    path = tmp_path / "detection.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.slow
def test_the_detection_demo_search_runs_end_to_end_through_the_cli(tmp_path):
    import pandas as pd

    from tests.test_search_e2e import cli, mlflow_children

    result = cli("run", str(detection_space(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best trial:" in result.stdout and "final_test_ap" in result.stdout
    assert "R-CNN head on object proposals, train top-1" in result.stdout
    experiment = tmp_path / "runs" / "detection_demo"
    state = json.loads((experiment / "state.json").read_text())
    assert state["status"] == "done" and state["parts_done"] == ["baseline-ce", "frcnn_small"]
    frame = pd.read_parquet(experiment / "results.parquet")
    assert len(frame) == 3 and frame["status"].isin(["completed", "stopped"]).all()
    assert (frame["status"] == "completed").sum() >= 2  # the baseline, and at least one searched trial
    assert frame["final_test_ap"].notna().all() and frame["final_val_ap"].notna().all()
    assert frame["final_test_acc"].isna().all()
    searched = frame[frame["part"] == "frcnn_small"]
    assert searched["teacher_gap"].notna().all() and searched["teacher_gap_background"].notna().all()
    assert searched["beta"].between(0.0625, 4).all()
    gap = state["teachers"]["frcnn_small"]["gap"]
    assert gap["num_samples"] > 0 and gap["background_samples"] > 0

    client, parent, children = mlflow_children(tmp_path, state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert "teacher_gap" in parent.data.tags and "teacher_gap_background.frcnn_small" in parent.data.tags
    completed = searched[searched["status"] == "completed"]
    # The file's metric is val_ap; tied trials (a tiny validation split) go to the lower trial id.
    chosen = completed.sort_values(["final_val_ap", "trial_id"], ascending=[False, True]).iloc[0]
    assert parent.data.metrics["best_final_test_ap"] == pytest.approx(chosen["final_test_ap"])
    assert "best_final_test_acc" not in parent.data.metrics
    trials = [run for run in children if run.data.tags.get("dkd_tune.kind") == "trial"] or children
    assert len(trials) >= 3
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "test_ap")
        assert [point.step for point in history] in ([1, 2], [1])  # [1]: stopped by ASHA at its rung
        assert "val_ap" in run.data.metrics and "train_loss_classifier" in run.data.metrics


def test_detection_search_files_refuse_what_does_not_fit_in_one_line(tmp_path):
    from tests.test_search_e2e import cli

    missing = detection_space(tmp_path, data={"name": "coco", "root": str(tmp_path / "nowhere")})
    result = cli("run", str(missing), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "instances_train2017.json: annotation file not found" in result.stderr
    assert not (tmp_path / "runs").exists()

    classifier = detection_space(tmp_path, student="resnet8")
    result = cli("run", str(classifier), cwd=tmp_path)
    assert result.returncode == 2 and "student: unknown model 'resnet8'" in result.stderr, result.stderr

    accuracy = detection_space(tmp_path, metric="val_acc")
    result = cli("run", str(accuracy), cwd=tmp_path)
    assert result.returncode == 2 and "'val_acc' is a classifier's metric" in result.stderr, result.stderr


@pytest.mark.slow
def test_detection_trials_of_two_ddp_workers(tmp_path):
    """resources.workers > 1: a detection trial is a Ray Train TorchTrainer of 2 gloo processes, AP gathered over both."""
    import pandas as pd

    from tests.test_search_e2e import cli

    space = detection_space(
        tmp_path,
        resources={"cpu": 1, "workers": 2},
        baselines=[],
        search={"algorithm": "optuna", "seed": 0, "num_samples": 1, "max_concurrent_trials": 1},
        scheduler={"type": "none"},
    )
    result = cli("run", str(space), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_parquet(tmp_path / "runs" / "detection_demo" / "results.parquet")
    assert len(frame) == 1 and frame["status"].iloc[0] == "completed" and frame["stop_epoch"].iloc[0] == 2
    assert frame["final_test_ap"].notna().all() and Path(frame["checkpoint_path"].iloc[0]).is_file()


def test_the_coco_1x_recipe_is_the_official_dkd_detection_schedule():
    recipe = resolve_recipe("coco-1x")  # mdistiller's DKD configs: batch 8, lr 0.01, 180k iterations
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.lr_milestones) == (12, 8, 0.01, (8, 11))
    assert recipe.warmup_epochs == 0 and recipe.warmup_factor_at(0) == 1.0  # no ramp of DKD's weight
    assert (recipe.weight_decay, recipe.momentum, recipe.lr_decay) == (1e-4, 0.9, 0.1)
    assert (recipe.alpha, recipe.beta, recipe.temperature, recipe.ce_weight) == (1.0, 0.25, 1.0, 1.0)
    assert resolve_recipe("coco-1x", overrides={"beta": 1}).beta == 1.0


def test_an_imagenet_backbone_that_cannot_be_downloaded_is_one_line(monkeypatch, tmp_path):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        UserInputError, match=r"frcnn_r18_fpn: torchvision's ImageNet weights for its ResNet-18 backbone"
    ):
        create_detector("frcnn_r18_fpn", 7, pretrained_backbone=True)
    assert (
        create_detector("frcnn_tiny", 7, pretrained_backbone=True) is not None
    )  # has no pretrained backbone


def test_flips_follow_the_seed_and_epoch_so_workers_and_a_resume_see_the_same_images(coco):
    """Workers kept alive across epochs flip exactly as the main process does, epoch after epoch: a resumed
    run (a fresh loader set to the epoch) sees the images an uninterrupted one saw."""
    from dkd_tune.data.coco import detection_loader

    def epochs(workers: int, start: int = 0) -> list[list[list[float]]]:
        loader = detection_loader(coco.dataset("train", train=True), 8, seed=5, shuffle=True, workers=workers)
        seen = []
        for epoch in range(start, 3):
            loader.sampler.set_epoch(epoch)
            seen.append([t["boxes"].flatten().tolist() for _, batch in loader for t in batch][:24])
        return seen

    in_process, with_workers = epochs(0), epochs(2)
    assert in_process == with_workers
    assert in_process[0] != in_process[1]  # another epoch, other flips and order
    assert epochs(2, start=1) == in_process[1:]  # resumed at epoch 1


def test_train_teacher_and_distill_take_detectors_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    coco_root, tmp_path, capsys
):
    """`dkd-tune train-teacher` and `dkd-tune distill` for detectors, as for classifiers; a run stopped after
    its first epoch and resumed gives the weights of one run straight through (same images, same flips)."""
    from dkd_tune.cli import main
    from dkd_tune.models.weights_file import read_model_checkpoint

    data = f"synthetic-coco:{coco_root}"
    common = ["--recipe", "coco-1x", "--data", data, "--device", "cpu", "--set", "batch_size=8"]
    main(
        ["train-teacher", "--model", "frcnn_tiny", "--out", str(tmp_path / "t"), "--set", "epochs=1", *common]
    )
    teacher = tmp_path / "t" / "best.pt"
    assert read_model_checkpoint(teacher).categories == tuple(load_coco(coco_root, name="synthetic-coco",
                                                                         validation=0, augment="standard").category_names)  # fmt: skip
    distill = ["distill", "--student", "frcnn_tiny", "--teacher-model", "frcnn_tiny", "--teacher-checkpoint",
               str(teacher), *common]  # fmt: skip
    main([*distill, "--out", str(tmp_path / "straight"), "--set", "epochs=2"])
    main([*distill, "--out", str(tmp_path / "resumed"), "--set", "epochs=1"])
    # Continue the one-epoch run to two epochs: the same schedule as the straight run from epoch 2 on.
    from dkd_tune.engine.checkpoints import LAST_CHECKPOINT

    assert (tmp_path / "resumed" / LAST_CHECKPOINT).is_file()
    with pytest.raises(SystemExit) as stopped:
        main([*distill, "--out", str(tmp_path / "resumed"), "--set", "epochs=2"])
    assert stopped.value.code == 2 and "pass --resume" in capsys.readouterr().err
    main([*distill, "--out", str(tmp_path / "resumed"), "--set", "epochs=2", "--resume"])
    straight = read_model_checkpoint(tmp_path / "straight" / "last.pt").state_dict
    resumed = read_model_checkpoint(tmp_path / "resumed" / "last.pt").state_dict
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit) as stopped:
        main(
            ["train-teacher", "--model", "frcnn_tiny", "--out", str(tmp_path / "x"), "--data", "synthetic:/x"]
        )
    assert stopped.value.code == 2 and "needs COCO-format data" in capsys.readouterr().err
