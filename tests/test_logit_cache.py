"""The exact teacher-logit cache: equal to the live teacher, resumable, reused, refused when damaged or too big."""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import resolve_recipe
from dkd_tune.data import Batch, DeviceAugmentLoader, EvalLoader, ImageDataset, normalize, render_views
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD
from dkd_tune.engine.loop import fit
from dkd_tune.engine.run_setup import RunIdentity
from dkd_tune.models import create_model
from dkd_tune.teacher.logit_cache import (
    CACHE_DATA_FILE,
    CACHE_META_FILE,
    CACHE_PROGRESS_FILE,
    CorruptCacheError,
    TeacherLogitCache,
    teacher_weights_digest,
)

# A cached logit is the float32 logit rounded to float16: off by at most half a float16 spacing
# (2**-11 relative). Float32 results also vary slightly with the batch a view was computed in,
# which can move the rounding to the next float16 value: allow one full spacing, plus a float32
# noise floor for logits near zero.
FP16_RTOL = torch.finfo(torch.float16).eps
FP32_NOISE_ATOL = 1e-5

NUM_IMAGES, NUM_CLASSES, SIDE = 24, 5, 16


# One torch thread: small models, and results that do not depend on the machine's core count.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def random_dataset(count: int = NUM_IMAGES, seed: int = 0) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    return ImageDataset(
        images=torch.randint(0, 256, (count, 3, SIDE, SIDE), dtype=torch.uint8, generator=generator),
        labels=torch.randint(0, NUM_CLASSES, (count,), generator=generator),
        num_classes=NUM_CLASSES,
        class_names=[f"c{index}" for index in range(NUM_CLASSES)],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        name="random",
    )


def teacher_for(dataset: ImageDataset, seed: int = 0, logit_scale: float = 60.0) -> nn.Module:
    """A random resnet8 with batch-norm statistics of the data and logits of a trained teacher's size (~10)."""
    torch.manual_seed(seed)
    teacher = create_model("resnet8", num_classes=NUM_CLASSES)
    with torch.no_grad():
        teacher.train()
        for _ in range(3):
            teacher(normalize(dataset.images, dataset.mean, dataset.std))
        teacher.fc.weight.mul_(logit_scale)
    return teacher.eval()


class ForwardCounter:
    """Counts the teacher's forward calls; raises after `fail_after` of them (an interrupted build)."""

    def __init__(self, model: nn.Module, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("build interrupted by the test")

    def remove(self) -> None:
        self.handle.remove()


def build(teacher, dataset, directory, lines=None, **options):
    options = {"chunk_images": 4, "batch_size": 2 * 162, "progress": False, **options}
    return TeacherLogitCache.build(
        teacher, dataset, directory, log=(lines.append if lines is not None else lambda _: None), **options
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dataset = random_dataset()
    teacher = teacher_for(dataset)
    cache = build(teacher, dataset, tmp_path_factory.mktemp("cache"))
    return dataset, teacher, cache


def live_logits(teacher, dataset, indices, view_ids, padding=4, flip=True):
    pixels = render_views(dataset.images[indices], view_ids, padding, flip)
    with torch.no_grad():
        return teacher(normalize(pixels, dataset.mean, dataset.std))


# ------------------------------------------------------------------------------------------------
# Exactness


def test_cached_logits_equal_the_live_teacher_for_random_images_and_views(built):
    dataset, teacher, cache = built
    assert (cache.num_samples, cache.num_views, cache.num_classes) == (NUM_IMAGES, 162, NUM_CLASSES)
    assert cache.nbytes == NUM_IMAGES * 162 * NUM_CLASSES * 2
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        indices = torch.randint(0, NUM_IMAGES, (32,), generator=generator)
        view_ids = torch.randint(0, 162, (32,), generator=generator)
        cached = cache.logits_for(Batch(torch.empty(0), torch.empty(0), indices, view_ids))
        live = live_logits(teacher, dataset, indices, view_ids)
        assert cached.dtype == torch.float16 and cached.shape == (32, NUM_CLASSES)
        assert live.abs().max() > 4  # logits large enough for float16's relative spacing to matter
        torch.testing.assert_close(cached.float(), live, rtol=FP16_RTOL, atol=FP32_NOISE_ATOL)


def test_every_view_of_an_image_matches_and_the_views_differ(built):
    dataset, teacher, cache = built
    view_ids = torch.arange(162)
    indices = torch.full((162,), 7)
    cached = cache.logits_for(Batch(torch.empty(0), torch.empty(0), indices, view_ids))
    live = live_logits(teacher, dataset, indices, view_ids)
    torch.testing.assert_close(cached.float(), live, rtol=FP16_RTOL, atol=FP32_NOISE_ATOL)
    assert len({tuple(row.tolist()) for row in cached}) > 150  # each view is its own entry


def test_cache_matches_the_training_loader_batches(built):
    """The loader's view ids index the same views the cache rendered (one gather, one layout)."""
    dataset, teacher, cache = built
    loader = DeviceAugmentLoader(dataset, 10, "cpu", seed=5)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            with torch.no_grad():
                live = teacher(batch.images)
            torch.testing.assert_close(
                cache.logits_for(batch).float(), live, rtol=FP16_RTOL, atol=FP32_NOISE_ATOL
            )


def test_teacher_batches_may_split_an_image_s_views(tmp_path):
    dataset = random_dataset(5)
    teacher = teacher_for(dataset)
    cache = build(teacher, dataset, tmp_path, batch_size=100, chunk_images=3)  # 486 views: 5 batches
    indices = torch.arange(5).repeat_interleave(162)
    view_ids = torch.arange(162).repeat(5)
    cached = cache.logits_for(Batch(torch.empty(0), torch.empty(0), indices, view_ids))
    live = live_logits(teacher, dataset, indices, view_ids)
    torch.testing.assert_close(cached.float(), live, rtol=FP16_RTOL, atol=FP32_NOISE_ATOL)


def test_unaugmented_cache_has_one_view_per_image(tmp_path):
    dataset = random_dataset(6)
    teacher = teacher_for(dataset)
    cache = build(teacher, dataset, tmp_path, padding=0, flip=False)
    assert cache.num_views == 1
    batch = next(iter(EvalLoader(dataset, 6, "cpu")))
    with torch.no_grad():
        live = teacher(batch.images)
    cached = cache.logits_for(batch._replace(view_ids=torch.zeros(6, dtype=torch.int64)))
    torch.testing.assert_close(cached.float(), live, rtol=FP16_RTOL, atol=FP32_NOISE_ATOL)


def test_dkd_training_with_the_cache_follows_the_live_teacher(tmp_path):
    dataset = random_dataset()
    # Random labels with a teacher of large logits and lr 0.05 make training chaotic enough that
    # any change of 1e-4 grows by an epoch's end; a calmer run shows what the cache itself changes.
    teacher = teacher_for(dataset, logit_scale=20.0)
    cache = build(teacher, dataset, tmp_path)
    recipe = dataclasses.replace(
        resolve_recipe("cifar100", student="resnet8", teacher="resnet8"),
        epochs=3,
        batch_size=8,
        lr=0.01,
        warmup_epochs=1,
        beta=8.0,
    )
    identity = RunIdentity(arch="resnet8", num_classes=NUM_CLASSES, input_size=SIDE)

    def run(source):
        torch.manual_seed(0)
        student = create_model("resnet8", num_classes=NUM_CLASSES)
        loader = DeviceAugmentLoader(dataset, recipe.batch_size, "cpu", seed=recipe.seed)
        return fit(
            student,
            loader,
            EvalLoader(dataset, 64, "cpu"),
            recipe,
            identity=identity,
            loss_mode="dkd",
            teacher=source,
            device="cpu",
        )

    live = run(teacher)
    cached = run(cache)
    for key in ("train_loss", "train_tckd", "train_nckd"):
        live_curve = torch.tensor([epoch[key] for epoch in live.history])
        cached_curve = torch.tensor([epoch[key] for epoch in cached.history])
        # Float16 teacher logits move each epoch's mean loss by ~1e-5..1e-4 relative.
        torch.testing.assert_close(cached_curve, live_curve, rtol=1e-3, atol=1e-5)
        assert not torch.equal(cached_curve, live_curve)  # the two runs did take different teachers
    assert live.history[0]["train_nckd"] > 0


# ------------------------------------------------------------------------------------------------
# Building: resumable, reused, keyed


def test_interrupted_build_resumes_and_ends_identical_to_an_uninterrupted_one(tmp_path):
    dataset = random_dataset()
    teacher = teacher_for(dataset)
    reference = build(teacher, dataset, tmp_path / "reference")

    # 1 call sizes the output, then 2 teacher batches per 4-image chunk: the 6th call is in chunk 3.
    counter = ForwardCounter(teacher, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        build(teacher, dataset, tmp_path / "resumed")
    counter.remove()
    (folder,) = (tmp_path / "resumed").iterdir()
    assert json.loads((folder / CACHE_PROGRESS_FILE).read_text())["images_done"] == 8
    assert not (folder / CACHE_META_FILE).exists()
    with pytest.raises(CorruptCacheError, match="incomplete"):
        TeacherLogitCache.open(folder)

    lines: list[str] = []
    counter = ForwardCounter(teacher)
    resumed = build(teacher, dataset, tmp_path / "resumed", lines)
    counter.remove()
    assert any("resuming after 8/24 images" in line for line in lines)
    assert counter.calls == 1 + (NUM_IMAGES - 8) // 2  # only the chunks left
    assert not (folder / CACHE_PROGRESS_FILE).exists()
    assert resumed.meta["sha256"] == reference.meta["sha256"]
    assert (folder / CACHE_DATA_FILE).read_bytes() == (
        tmp_path / "reference" / folder.name / CACHE_DATA_FILE
    ).read_bytes()


def test_complete_cache_is_reused_without_running_the_teacher(built, tmp_path):
    dataset, teacher, cache = built
    lines: list[str] = []
    counter = ForwardCounter(teacher)
    again = build(teacher, dataset, Path(cache.path).parent, lines)
    counter.remove()
    assert counter.calls == 0
    assert again.path == cache.path
    assert any("reusing" in line for line in lines)


def test_key_changes_with_teacher_weights_dataset_and_augmentation(built, tmp_path):
    dataset, teacher, cache = built
    changed = teacher_for(dataset)
    with torch.no_grad():
        changed.fc.bias[0] += 1e-3
    assert teacher_weights_digest(changed) != teacher_weights_digest(teacher)
    other_teacher = build(changed, dataset, tmp_path)
    images = dataset.images.clone()
    images[0, 0, 0, 0] ^= 1
    other_data = build(teacher, dataclasses.replace(dataset, images=images), tmp_path)
    other_views = build(teacher, dataset, tmp_path, padding=2)
    keys = {cache.key, other_teacher.key, other_data.key, other_views.key}
    assert len(keys) == 4
    assert other_views.num_views == 5 * 5 * 2
    # Logits do not depend on labels: noisy labels share the clean labels' cache.
    relabelled = build(teacher, dataclasses.replace(dataset, labels=dataset.labels.roll(1)), tmp_path)
    assert relabelled.key == cache.key


# ------------------------------------------------------------------------------------------------
# Damage and refusal


def test_truncated_cache_is_refused_with_one_line_and_rebuilt_by_build(tmp_path):
    dataset = random_dataset(6)
    teacher = teacher_for(dataset)
    cache = build(teacher, dataset, tmp_path)
    data_path = Path(cache.path) / CACHE_DATA_FILE
    with open(data_path, "r+b") as file:
        file.truncate(cache.nbytes - 2)
    with pytest.raises(CorruptCacheError) as refused:
        TeacherLogitCache.open(cache.path)
    message = str(refused.value)
    assert "\n" not in message and str(data_path) in message and "truncated" in message
    assert isinstance(refused.value, UserInputError)

    lines: list[str] = []
    rebuilt = build(teacher, dataset, tmp_path, lines)
    assert any("building it again" in line for line in lines)
    assert rebuilt.meta["sha256"] == cache.meta["sha256"]


def test_corrupted_byte_is_found_by_verify(tmp_path):
    dataset = random_dataset(6)
    teacher = teacher_for(dataset)
    cache = build(teacher, dataset, tmp_path)
    data_path = f"{cache.path}/{CACHE_DATA_FILE}"
    with open(data_path, "r+b") as file:
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0xFF]))
    TeacherLogitCache.open(cache.path)  # the size is right: only the hash can tell
    with pytest.raises(CorruptCacheError, match="SHA-256") as refused:
        TeacherLogitCache.open(cache.path, verify=True)
    assert "\n" not in str(refused.value) and data_path in str(refused.value)


def test_missing_cache_is_a_one_line_error(tmp_path):
    with pytest.raises(CorruptCacheError, match="not found"):
        TeacherLogitCache.open(tmp_path / "nothing-here")


def test_build_refuses_when_the_disk_lacks_room(tmp_path, monkeypatch):
    dataset = random_dataset(6)
    teacher = teacher_for(dataset)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    lines: list[str] = []
    with pytest.raises(UserInputError) as refused:
        build(teacher, dataset, tmp_path, lines)
    message = str(refused.value)
    assert "\n" not in message and "needs" in message and "free" in message
    assert any("6 images x 162 views x 5 classes" in line for line in lines)  # size reported first
    assert not list(tmp_path.rglob(CACHE_META_FILE))


def test_logits_for_needs_view_ids(built):
    _, _, cache = built
    batch = Batch(torch.zeros(2, 3, SIDE, SIDE), torch.zeros(2, dtype=torch.int64), torch.arange(2), None)
    with pytest.raises(ValueError, match="view ids"):
        cache.logits_for(batch)
    assert cache.to("cpu") is cache
