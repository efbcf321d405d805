"""Teachers: the logit gap against a hand-computed example, and a search's teacher trained once, reused, resumed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.data import EvalLoader, ImageDataset, build_train_loader, load_train_test, parse_data_spec
from dkd_tune.data.synthetic import make_synthetic
from dkd_tune.engine.checkpoints import LAST_CHECKPOINT
from dkd_tune.engine.loop import LiveTeacher, fit
from dkd_tune.engine.run_setup import RunIdentity
from dkd_tune.models import create_model, load_teacher
from dkd_tune.tasks import teacher_logit_source
from dkd_tune.teacher import preparation as teacher_module
from dkd_tune.teacher.auto_beta import default_calibration_or_none
from dkd_tune.teacher.gap import LogitGapStats, measure_logit_gap
from dkd_tune.teacher.logit_cache import TeacherLogitCache, augmentation_views, dataset_fingerprint
from dkd_tune.teacher.logit_interventions import IntervenedTeacher, LogitIntervention, permute_non_target
from dkd_tune.teacher.preparation import TeacherArtifacts, prepare_teacher, teacher_training_dir

# One torch thread: small models, and results that do not depend on the machine's core count.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------------------------
# The logit gap on a teacher whose logits are known


def pixel_dataset(pixels: list[list[int]], labels: list[int]) -> ImageDataset:
    """1x1 three-channel images; with mean 0 and std 1/255 the normalised image is the pixel values."""
    return ImageDataset(
        images=torch.tensor(pixels, dtype=torch.uint8).view(-1, 3, 1, 1),
        labels=torch.tensor(labels),
        num_classes=3,
        class_names=["a", "b", "c"],
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255, 1 / 255, 1 / 255),
        name="pixels",
    )


def identity_teacher() -> nn.Module:
    """Logits = the image's three pixel values; dropout shows whether eval mode was used."""
    linear = nn.Linear(3, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
        linear.bias.zero_()
    return nn.Sequential(nn.Dropout(0.9), nn.Flatten(), linear)


TRAIN = pixel_dataset(
    [[10, 4, 1], [2, 9, 5], [7, 3, 8], [0, 0, 3]],
    [0, 1, 0, 2],
)  # gaps: 10-4=6, 9-5=4, 7-8=-1 (wrong), 3-0=3
TEST = pixel_dataset([[1, 2, 3], [5, 1, 0]], [2, 1])  # right, wrong


def test_gap_statistics_match_the_hand_computed_values():
    teacher = identity_teacher().train()
    stats = measure_logit_gap(teacher, TRAIN, TEST, batch_size=3, progress=False)
    assert stats.mean == pytest.approx(3.0)
    assert stats.median == pytest.approx(3.5)  # the two middle values of (-1, 3, 4, 6)
    assert stats.std == pytest.approx(math.sqrt((9 + 1 + 16 + 0) / 4))
    assert stats.negative_fraction == pytest.approx(0.25)
    assert stats.train_acc == pytest.approx(75.0)
    assert stats.test_acc == pytest.approx(50.0)
    assert stats.num_samples == 4
    assert teacher.training  # its mode is given back


def test_gap_median_of_an_odd_count_and_without_a_test_set():
    odd = pixel_dataset([[10, 4, 1], [2, 9, 5], [7, 3, 8]], [0, 1, 0])
    stats = measure_logit_gap(identity_teacher(), odd, progress=False)
    assert stats.median == pytest.approx(4.0)
    assert math.isnan(stats.test_acc)
    assert json.loads(json.dumps(stats.to_dict()))["test_acc"] is None
    assert math.isnan(LogitGapStats.from_dict(stats.to_dict()).test_acc)


def test_gap_refuses_a_teacher_with_another_class_count():
    wide = pixel_dataset([[1, 2, 3]], [0])
    wide.num_classes = 5
    with pytest.raises(UserInputError, match="3 outputs but dataset 'pixels' has 5 classes"):
        measure_logit_gap(identity_teacher(), wide, progress=False)


def test_dataset_fingerprint_sees_pixels_labels_and_normalisation():
    base = dataset_fingerprint(TRAIN)
    assert (
        dataset_fingerprint(pixel_dataset([[10, 4, 1], [2, 9, 5], [7, 3, 8], [0, 0, 3]], [0, 1, 0, 2]))
        == base
    )
    assert (
        dataset_fingerprint(pixel_dataset([[10, 4, 1], [2, 9, 5], [7, 3, 8], [0, 0, 3]], [0, 1, 0, 1]))
        != base
    )
    assert (
        dataset_fingerprint(pixel_dataset([[10, 4, 1], [2, 9, 5], [7, 3, 8], [0, 0, 4]], [0, 1, 0, 2]))
        != base
    )
    moved = pixel_dataset([[10, 4, 1], [2, 9, 5], [7, 3, 8], [0, 0, 3]], [0, 1, 0, 2])
    moved.mean = (0.1, 0.0, 0.0)
    assert dataset_fingerprint(moved) != base


def test_views_of_each_augmentation_and_default_calibrations():
    assert augmentation_views("standard") == (4, True)
    assert augmentation_views("none") == (0, False)
    assert augmentation_views("autoaugment") is None
    assert default_calibration_or_none("cifar").family == "cifar"
    assert default_calibration_or_none("synthetic").teachers  # fitted by validate-beta
    assert default_calibration_or_none("imagenet") is None
    with pytest.raises(UserInputError):
        default_calibration_or_none("mnist")


# ------------------------------------------------------------------------------------------------
# prepare_teacher: a search's teacher


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = make_synthetic(
        tmp_path_factory.mktemp("data"),
        classes=4,
        superclasses=2,
        train_per_class=8,
        test_per_class=3,
        image_size=16,
        seed=1,
    )
    return load_train_test(parse_data_spec(f"synthetic:{root}"))


def teacher_recipe(epochs: int = 2):
    return resolve_recipe(
        "teacher-cifar100", student="resnet8", overrides={"epochs": epochs, "batch_size": 16}
    )


def prepare(small_data, tmp_path, lines, recipe, cache_dir=None, note="off (test)"):
    train_set, test_set = small_data
    return prepare_teacher(
        label="t",
        model="resnet8",
        checkpoint=None,
        train_recipe=recipe,
        train_set=train_set,
        test_set=test_set,
        augment="standard",
        teachers_dir=tmp_path / "teachers",
        cache_dir=cache_dir,
        cache_note=note,
        device=torch.device("cpu"),
        log=lines.append,
    )


def test_prepare_teacher_trains_once_then_reuses_it(small_data, tmp_path, monkeypatch):
    lines: list[str] = []
    first = prepare(small_data, tmp_path, lines, teacher_recipe())
    assert any("training it" in line for line in lines)
    model = load_teacher("resnet8", first.checkpoint, num_classes=4)
    assert first.checkpoint.endswith("best.pt") and model.num_classes == 4
    assert first.gap is not None and first.gap.num_samples == len(small_data[0])
    assert first.cache_path is None and first.cache_note == "off (test)"

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher was trained a second time")

    monkeypatch.setattr(teacher_module, "fit", no_training)
    lines.clear()
    second = prepare(small_data, tmp_path, lines, teacher_recipe())
    assert any("reusing the teacher trained earlier" in line for line in lines)
    assert second == first

    restored = TeacherArtifacts.from_dict(json.loads(json.dumps(second.to_dict())))
    assert restored == second


def test_prepare_teacher_resumes_an_interrupted_training(small_data, tmp_path):
    train_set, test_set = small_data
    recipe = teacher_recipe(epochs=3)
    folder = teacher_training_dir(tmp_path / "teachers", "resnet8", recipe, train_set, "standard")
    torch.manual_seed(0)
    fit(
        create_model("resnet8", num_classes=4),
        build_train_loader(train_set, "standard", recipe.batch_size, "cpu", seed=recipe.seed),
        EvalLoader(test_set, 64, "cpu"),
        recipe,
        identity=RunIdentity(arch="resnet8", num_classes=4, dataset="synthetic", input_size=16),
        loss_mode="ce",
        checkpoint_dir=folder,
        stop_after_epochs=1,
    )
    lines: list[str] = []
    artifacts = prepare(small_data, tmp_path, lines, recipe)
    assert any("resuming its interrupted training" in line for line in lines)
    epoch_lines = [line for line in lines if " epoch " in line]
    assert [line.split(" epoch ")[1].split(":")[0] for line in epoch_lines] == ["2/3", "3/3"]
    record = json.loads((folder / teacher_module.TEACHER_RECORD).read_text())
    assert record["epochs"] == 3
    assert artifacts.checkpoint == str(folder / "best.pt")
    assert (folder / LAST_CHECKPOINT).is_file()


def test_prepare_teacher_from_a_checkpoint_builds_the_logit_cache(small_data, tmp_path):
    train_set, test_set = small_data
    trained = prepare(small_data, tmp_path, [], teacher_recipe())
    lines: list[str] = []
    artifacts = prepare_teacher(
        label="given",
        model="resnet8",
        checkpoint=trained.checkpoint,
        train_recipe=None,
        train_set=train_set,
        test_set=test_set,
        augment="standard",
        teachers_dir=tmp_path / "teachers",
        cache_dir=tmp_path / "logits",
        cache_note="on (test)",
        device=torch.device("cpu"),
        log=lines.append,
    )
    assert artifacts.gap == trained.gap
    cache = TeacherLogitCache.open(artifacts.cache_path, verify=True)
    assert (cache.num_samples, cache.num_views, cache.num_classes) == (len(train_set), 162, 4)
    assert any("logit cache on (test)" in line for line in lines)
    # The counts the log names are the ones the progress bar counts: training and test images.
    counted = f"on {len(train_set)} training images and its top-1 on {len(test_set)} test images"
    assert any(counted in line for line in lines)
    assert TeacherArtifacts.from_dict(json.loads(json.dumps(artifacts.to_dict()))) == artifacts

    # A trial takes the cache for a loader with finite views, the live teacher otherwise.
    loader = build_train_loader(train_set, "standard", 8, "cpu", seed=0)
    assert isinstance(teacher_logit_source(artifacts, loader, torch.device("cpu")), TeacherLogitCache)
    loader.num_views = None
    assert isinstance(teacher_logit_source(artifacts, loader, torch.device("cpu")), LiveTeacher)

    # The negative control's teacher: either source, wrapped; the flag survives the state file.
    control = dataclasses.replace(artifacts, intervention=LogitIntervention(non_target="permuted"))
    assert TeacherArtifacts.from_dict(json.loads(json.dumps(control.to_dict()))) == control
    source = teacher_logit_source(control, loader, torch.device("cpu"))
    assert isinstance(source, IntervenedTeacher) and isinstance(source.source, LiveTeacher)
    batch = next(iter(build_train_loader(train_set, "standard", 8, "cpu", seed=0)))
    plain = source.source.logits_for(batch)
    shuffled = source.logits_for(batch)
    assert torch.equal(shuffled.gather(1, batch.labels[:, None]), plain.gather(1, batch.labels[:, None]))
    assert not torch.equal(shuffled, plain)


# ------------------------------------------------------------------------------------------------
# The negative control's teacher: non-target logits permuted per image


def test_permuted_non_target_keeps_the_target_the_values_and_the_gap():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    indices = torch.arange(100, 164)
    permuted = permute_non_target(logits, labels, indices)
    target = labels[:, None]
    assert torch.equal(permuted.gather(1, target), logits.gather(1, target))
    assert torch.equal(permuted.sort(dim=1).values, logits.sort(dim=1).values)

    def gap(values):
        non_target = values.scatter(1, target, float("-inf"))
        return values.gather(1, target).squeeze(1) - non_target.max(dim=1).values

    assert torch.equal(gap(permuted), gap(logits))
    moved = (permuted != logits).float().mean().item()
    assert moved > 0.7  # 9 non-target places each, nearly all change


def test_permuted_non_target_is_fixed_per_image_and_differs_between_images():
    logits = torch.arange(10.0).expand(3000, 10).contiguous()
    labels = torch.zeros(3000, dtype=torch.long)
    indices = torch.arange(3000)
    permuted = permute_non_target(logits, labels, indices)
    # The same image in another batch, in another position, in another epoch: the same order.
    subset = torch.tensor([2999, 5, 17])
    assert torch.equal(permute_non_target(logits[subset], labels[subset], indices[subset]), permuted[subset])
    # Another seed is another control; images get orders of their own: the largest non-target
    # logit lands in each of the 9 non-target places about equally often (expected 333, sd 17).
    assert not torch.equal(permute_non_target(logits, labels, indices, seed=1), permuted)
    counts = torch.bincount(permuted[:, 1:].argmax(dim=1), minlength=9)
    assert counts.min() > 250 and counts.max() < 420


def test_prepare_teacher_needs_weights_or_a_recipe(small_data, tmp_path):
    train_set, test_set = small_data
    with pytest.raises(UserInputError, match="checkpoint or a train"):
        prepare_teacher(
            label="none",
            model="resnet8",
            checkpoint=None,
            train_recipe=None,
            train_set=train_set,
            test_set=test_set,
            augment="standard",
            teachers_dir=tmp_path,
            cache_dir=None,
            cache_note="off",
            device=torch.device("cpu"),
            log=lambda _: None,
        )
