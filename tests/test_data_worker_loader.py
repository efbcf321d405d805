"""The CPU-worker path (AutoAugment after crop + flip): Batch interface, determinism for any worker count, sharding."""

import torch

from dkd_tune.data import WorkerAugmentLoader, normalize
from dkd_tune.data.worker_loader import cifar_autoaugment_transform
from tests.test_data_views import random_dataset


def collect(loader, epoch):
    loader.set_epoch(epoch)
    return [(b.images, b.labels, b.indices) for b in loader]


def test_batches_deterministic_for_a_seed_whatever_the_worker_count():
    dataset = random_dataset(count=40)
    in_process = collect(WorkerAugmentLoader(dataset, 16, "cpu", seed=4, workers=0), 1)
    in_workers = collect(WorkerAugmentLoader(dataset, 16, "cpu", seed=4, workers=2), 1)
    assert len(in_process) == 3
    for (a_img, a_lab, a_idx), (b_img, b_lab, b_idx) in zip(in_process, in_workers, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab) and torch.equal(a_idx, b_idx)
        assert torch.equal(a_lab, dataset.labels[a_idx])
    other_epoch = collect(WorkerAugmentLoader(dataset, 16, "cpu", seed=4, workers=0), 2)
    assert not torch.equal(in_process[0][2], other_epoch[0][2])


def test_each_sample_is_crop_flip_autoaugment_under_its_own_seed():
    dataset = random_dataset(count=8)
    loader = WorkerAugmentLoader(dataset, 8, "cpu", seed=0, workers=0, shuffle=False)
    batch = next(iter(loader))
    assert batch.view_ids is None and batch.images.dtype == torch.float32
    indices, seeds = loader.epoch_plan(0)
    transform = cifar_autoaugment_transform((32, 32))
    for b in range(8):
        torch.manual_seed(int(seeds[b]))
        expected = normalize(transform(dataset.images[indices[b]])[None], dataset.mean, dataset.std)[0]
        assert torch.equal(batch.images[b], expected)
    assert not torch.equal(batch.images, normalize(dataset.images, dataset.mean, dataset.std))


def test_ranks_split_the_epoch_with_padding_or_exactly():
    dataset = random_dataset(count=10)
    padded = [
        WorkerAugmentLoader(dataset, 4, "cpu", seed=0, workers=0, rank=r, world_size=3) for r in range(3)
    ]
    shares = [torch.cat([b.indices for b in loader]) for loader in padded]
    assert [len(s) for s in shares] == [4, 4, 4] and set(torch.cat(shares).tolist()) == set(range(10))
    exact = [
        WorkerAugmentLoader(
            dataset, 4, "cpu", seed=0, workers=0, rank=r, world_size=3, shuffle=False, pad_shards=False
        )
        for r in range(3)
    ]
    assert sorted(torch.cat([b.indices for loader in exact for b in loader]).tolist()) == list(range(10))
