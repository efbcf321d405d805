"""Device-resident augmentation: pixel-exact views, uniform and independent draws, determinism, sharding."""

import pytest
import torch
import torchvision.transforms.functional as TF

from dkd_tune.data import (
    Batch,
    DeviceAugmentLoader,
    EvalLoader,
    ImageDataset,
    build_train_loader,
    normalize,
    render_views,
)
from dkd_tune.data.views import decode_view_ids, num_views, view_id
from dkd_tune.data.worker_loader import WorkerAugmentLoader


def random_dataset(count=300, size=32, channels=3, classes=10, seed=0) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    return ImageDataset(
        images=torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator),
        labels=torch.randint(0, classes, (count,), generator=generator),
        num_classes=classes,
        class_names=[f"c{i}" for i in range(classes)],
        mean=(0.5, 0.4, 0.3)[:channels],
        std=(0.25, 0.2, 0.3)[:channels],
        name="random",
    )


def reference_view(image: torch.Tensor, dy: int, dx: int, flipped: int, padding: int) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip for a given outcome."""
    height, width = image.shape[1:]
    out = TF.crop(TF.pad(image, [padding], fill=0), dy, dx, height, width)
    return TF.hflip(out) if flipped else out


def chi_square_p_value(statistic: float, degrees_of_freedom: int) -> float:
    return float(
        torch.special.gammaincc(
            torch.tensor(degrees_of_freedom / 2, dtype=torch.float64),
            torch.tensor(statistic / 2, dtype=torch.float64),
        )
    )


def uniformity_p_value(values: torch.Tensor, categories: int) -> float:
    counts = torch.bincount(values, minlength=categories).double()
    expected = values.numel() / categories
    return chi_square_p_value(float(((counts - expected) ** 2 / expected).sum()), categories - 1)


def independence_p_value(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> float:
    table = (
        torch.bincount(rows * num_cols + cols, minlength=num_rows * num_cols)
        .double()
        .view(num_rows, num_cols)
    )
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return chi_square_p_value(statistic, (num_rows - 1) * (num_cols - 1))


# --- pixel-exact rendering ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("padding", "flip", "size"), [(4, True, 32), (2, True, 16), (4, False, 32), (0, False, 8)]
)
def test_render_views_equals_torchvision_for_every_view(padding, flip, size):
    images = random_dataset(count=num_views(padding, flip), size=size).images
    views = torch.arange(num_views(padding, flip))
    rendered = render_views(images, views, padding=padding, flip=flip)
    dy, dx, flipped = decode_view_ids(views, padding, flip)
    for b in range(len(views)):
        expected = reference_view(images[b], int(dy[b]), int(dx[b]), int(flipped[b]), padding)
        assert torch.equal(rendered[b], expected), f"view {b}"


def test_view_id_layout_matches_the_documented_formula():
    dy, dx, flipped = torch.meshgrid(torch.arange(9), torch.arange(9), torch.arange(2), indexing="ij")
    ids = view_id(dy.flatten(), dx.flatten(), flipped.flatten(), padding=4)
    assert torch.equal(ids, (dy.flatten() * 9 + dx.flatten()) * 2 + flipped.flatten())
    assert torch.equal(ids.sort().values, torch.arange(162))
    assert all(
        torch.equal(a, b.flatten()) for a, b in zip(decode_view_ids(ids, 4), (dy, dx, flipped), strict=True)
    )


def test_render_all_views_of_a_few_images_in_one_call():
    """The teacher-logit cache's use: every one of the 162 views of each image, batched."""
    images = random_dataset(count=3).images
    repeated = images.repeat_interleave(162, dim=0)
    views = torch.arange(162).repeat(3)
    rendered = render_views(repeated, views).view(3, 162, 3, 32, 32)
    assert torch.equal(rendered[:, 2 * (4 * 9 + 4)], images)  # centred, unflipped view is the image
    assert torch.equal(rendered[:, 2 * (4 * 9 + 4) + 1], images.flip(-1))


def test_loader_batches_are_the_reported_views_normalised():
    dataset = random_dataset(count=200)
    loader = DeviceAugmentLoader(dataset, 64, "cpu", seed=3)
    seen = []
    for batch in loader:
        assert isinstance(batch, Batch)
        expected = normalize(
            render_views(dataset.images[batch.indices], batch.view_ids), dataset.mean, dataset.std
        )
        assert torch.equal(batch.images, expected)
        assert torch.equal(batch.labels, dataset.labels[batch.indices])
        dy, dx, flipped = decode_view_ids(batch.view_ids, 4)
        for b in range(0, len(batch.indices), 16):
            reference = reference_view(
                dataset.images[batch.indices[b]], int(dy[b]), int(dx[b]), int(flipped[b]), 4
            )
            manual = (reference.float() / 255 - torch.tensor(dataset.mean)[:, None, None]) / torch.tensor(
                dataset.std
            )[:, None, None]
            torch.testing.assert_close(batch.images[b], manual, rtol=0, atol=1e-5)
        seen.append(batch.indices)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(200))


def test_normalize_matches_the_formula_and_keeps_dtype_and_memory_format():
    images = random_dataset(count=4).images.contiguous(memory_format=torch.channels_last)
    out = normalize(images, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    manual = (
        images.double() / 255 - torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    ) / torch.tensor([0.25, 0.2, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), manual, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(
        normalize(images, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).double(), manual, rtol=0, atol=1e-5
    )


# --- the distribution of views -------------------------------------------------------------------


def drawn_views(epochs=150, count=1000, batch_size=500, seed=11):
    """(indices, view ids, position in batch) over many epochs of a small 1-channel 4x4 set (cheap renders)."""
    loader = DeviceAugmentLoader(
        random_dataset(count=count, size=4, channels=1), batch_size, "cpu", seed=seed
    )
    indices, views, positions = [], [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            indices.append(batch.indices)
            views.append(batch.view_ids)
            positions.append(torch.arange(len(batch.indices)))
    return torch.cat(indices), torch.cat(views), torch.cat(positions)


@pytest.fixture(scope="module")
def draws():
    return drawn_views()


def test_offsets_and_flips_are_uniform(draws):
    _, views, _ = draws
    dy, dx, flipped = decode_view_ids(views, 4)
    assert uniformity_p_value(dy * 9 + dx, 81) > 1e-3
    assert uniformity_p_value(flipped, 2) > 1e-3
    assert uniformity_p_value(views, 162) > 1e-3  # the joint: flips independent of offsets
    assert independence_p_value(dy * 9 + dx, flipped, 81, 2) > 1e-3


def test_views_are_independent_of_the_sample_and_of_the_neighbour(draws):
    indices, views, positions = draws
    dy, dx, flipped = decode_view_ids(views, 4)
    offset = dy * 9 + dx
    assert independence_p_value(indices % 10, offset, 10, 81) > 1e-3
    assert independence_p_value(indices % 10, flipped, 10, 2) > 1e-3
    assert independence_p_value(positions % 8, offset, 8, 81) > 1e-3
    assert independence_p_value(dy[:-1], dy[1:], 9, 9) > 1e-3  # consecutive samples
    assert independence_p_value(flipped[:-1], flipped[1:], 2, 2) > 1e-3


def test_the_statistical_checks_reject_plausible_biases(draws):
    """The thresholds have power: an off-by-one offset range, a 48% flip, or index-tied views all fail."""
    indices, views, _ = draws
    generator = torch.Generator().manual_seed(0)
    n = views.numel()
    off_by_one = torch.randint(0, 8, (n,), generator=generator) * 9 + torch.randint(
        0, 9, (n,), generator=generator
    )
    assert uniformity_p_value(off_by_one, 81) < 1e-6
    assert uniformity_p_value((torch.rand(n, generator=generator) < 0.48).long(), 2) < 1e-6
    tied = (indices * 7 + torch.randint(0, 2, (n,), generator=generator)) % 81  # offset depends on the sample
    assert independence_p_value(indices % 10, tied, 10, 81) < 1e-6


# --- determinism, epochs, sharding ---------------------------------------------------------------


def epoch_of(loader, epoch):
    loader.set_epoch(epoch)
    return [(b.indices.clone(), b.view_ids.clone(), b.images.clone()) for b in loader]


def test_deterministic_for_a_seed_and_reshuffled_each_epoch():
    dataset = random_dataset(count=130)
    first = epoch_of(DeviceAugmentLoader(dataset, 32, "cpu", seed=5), 2)
    again = epoch_of(DeviceAugmentLoader(dataset, 32, "cpu", seed=5), 2)
    assert all(
        torch.equal(a, b) for x, y in zip(first, again, strict=True) for a, b in zip(x, y, strict=True)
    )
    other_epoch = epoch_of(DeviceAugmentLoader(dataset, 32, "cpu", seed=5), 3)
    other_seed = epoch_of(DeviceAugmentLoader(dataset, 32, "cpu", seed=6), 2)
    assert not torch.equal(first[0][0], other_epoch[0][0]) and not torch.equal(first[0][1], other_epoch[0][1])
    assert not torch.equal(first[0][0], other_seed[0][0])


def test_iterating_advances_the_epoch_and_set_epoch_resumes():
    dataset = random_dataset(count=64)
    loader = DeviceAugmentLoader(dataset, 64, "cpu", seed=1)
    epoch0, epoch1 = next(iter(loader)).indices, next(iter(loader)).indices
    assert not torch.equal(epoch0, epoch1)
    resumed = DeviceAugmentLoader(dataset, 64, "cpu", seed=1)
    resumed.set_epoch(1)
    assert torch.equal(next(iter(resumed)).indices, epoch1)


def test_no_shuffle_keeps_order_and_drop_last_drops_the_tail():
    dataset = random_dataset(count=100)
    ordered = DeviceAugmentLoader(dataset, 30, "cpu", seed=0, shuffle=False)
    assert torch.equal(torch.cat([b.indices for b in ordered]), torch.arange(100))
    assert len(ordered) == 4
    dropping = DeviceAugmentLoader(dataset, 30, "cpu", seed=0, drop_last=True)
    sizes = [len(b.indices) for b in dropping]
    assert len(dropping) == 3 and sizes == [30, 30, 30]


@pytest.mark.parametrize(("count", "world_size"), [(100, 4), (103, 4), (5, 8)])
def test_ranks_share_the_epoch_like_distributed_sampler(count, world_size):
    dataset = random_dataset(count=count)
    shares = []
    for rank in range(world_size):
        loader = DeviceAugmentLoader(dataset, 7, "cpu", seed=2, rank=rank, world_size=world_size)
        loader.set_epoch(4)
        shares.append(torch.cat([b.indices for b in loader]))
        assert len(loader) == -(-len(shares[-1]) // 7)
    per_rank = -(-count // world_size)
    assert all(len(share) == per_rank for share in shares)
    union = torch.cat(shares)
    assert set(union.tolist()) == set(range(count))  # every sample covered
    assert len(union) - count == per_rank * world_size - count  # only the wrap-around padding repeats
    single = DeviceAugmentLoader(dataset, 1000, "cpu", seed=2)
    single.set_epoch(4)
    assert torch.equal(next(iter(single)).indices, torch.stack(shares, 1).flatten()[:count])


def test_eval_loader_is_ordered_unaugmented_and_sharded_without_padding():
    dataset = random_dataset(count=50)
    batches = list(EvalLoader(dataset, 16, "cpu"))
    assert [len(b.indices) for b in batches] == [16, 16, 16, 2]
    assert all(b.view_ids is None for b in batches)
    images = torch.cat([b.images for b in batches])
    assert torch.equal(images, normalize(dataset.images, dataset.mean, dataset.std))
    shards = [
        torch.cat([b.indices for b in EvalLoader(dataset, 16, "cpu", rank=r, world_size=3)]) for r in range(3)
    ]
    assert sorted(torch.cat(shards).tolist()) == list(range(50))


def test_channels_last_bf16_output():
    dataset = random_dataset(count=40)
    loader = DeviceAugmentLoader(dataset, 16, "cpu", seed=0, channels_last=True, dtype=torch.bfloat16)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.bfloat16 and batch.images.is_contiguous(
        memory_format=torch.channels_last
    )
    plain = DeviceAugmentLoader(dataset, 16, "cpu", seed=0)
    torch.testing.assert_close(batch.images.float(), next(iter(plain)).images, rtol=1e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_loaders_yield_identical_batches():
    dataset = random_dataset(count=100)
    cpu = DeviceAugmentLoader(dataset, 32, "cpu", seed=9)
    cuda = DeviceAugmentLoader(dataset, 32, "cuda", seed=9, channels_last=True)
    for a, b in zip(cpu, cuda, strict=True):
        assert torch.equal(a.indices, b.indices.cpu()) and torch.equal(a.view_ids, b.view_ids.cpu())
        torch.testing.assert_close(a.images, b.images.cpu(), rtol=0, atol=1e-5)


def test_build_train_loader_picks_the_path():
    dataset = random_dataset(count=40)
    standard = build_train_loader(dataset, "standard", 16, "cpu", seed=0)
    assert isinstance(standard, DeviceAugmentLoader) and standard.num_views == 162
    plain = build_train_loader(dataset, "none", 16, "cpu", seed=0)
    assert isinstance(plain, DeviceAugmentLoader) and plain.num_views == 1
    batch = next(iter(plain))
    assert torch.equal(batch.images, normalize(dataset.images[batch.indices], dataset.mean, dataset.std))
    strong = build_train_loader(dataset, "autoaugment", 16, "cpu", seed=0, workers=0)
    assert isinstance(strong, WorkerAugmentLoader)
    with pytest.raises(ValueError, match="augment"):
        build_train_loader(dataset, "cutmix", 16, "cpu", seed=0)
