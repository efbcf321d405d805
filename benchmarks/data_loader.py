"""Cost per batch of 64 of the device-resident loader vs the classic PIL + DataLoader pipeline, on CPU.

    python benchmarks/data_loader.py [--batches 150 --rounds 5 --threads 1]

Classic: CIFAR-style dataset of PIL images with torchvision's RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor and Normalize in a DataLoader with 2 workers (the usual CIFAR
recipe). Device: `DeviceAugmentLoader` on the CPU (the same crop/flip distribution). Also: the
AutoAugment worker path. Each round measures every pipeline once (interleaved, so background load
hits all alike); the table reports medians over rounds of the mean time per batch of a round,
after a warm-up (worker start-up excluded).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_tune.data import DeviceAugmentLoader, ImageDataset, WorkerAugmentLoader
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD

BATCH = 64
WARMUP_BATCHES = 10


class PilCifar(Dataset):
    """What torchvision.datasets.CIFAR100 does per sample: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def seconds_per_batch(iterable, batches: int) -> float:
    """Mean seconds per batch over `batches` batches after a warm-up, consuming each batch's images."""
    iterator = iter(iterable)
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        images = next(iterator)[0]
        images.sum()  # touch the result, as a training step would
    return (time.perf_counter() - started) / batches


def endless(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150, help="timed batches per pipeline per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--samples", type=int, default=50_000, help="training-set size (CIFAR-100: 50,000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchvision import transforms

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, args.samples)
    classic = DataLoader(
        PilCifar(
            images,
            labels,
            transforms.Compose(
                [
                    transforms.RandomCrop(32, padding=4),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
                ]
            ),
        ),
        batch_size=BATCH,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
    )
    dataset = ImageDataset(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels),
        num_classes=100,
        class_names=[str(i) for i in range(100)],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        name="random",
    )
    pipelines = {
        "classic: PIL + RandomCrop/Flip/ToTensor/Normalize, DataLoader 2 workers": endless(classic),
        "DeviceAugmentLoader (crop+flip+normalise, batched, CPU)": endless(
            DeviceAugmentLoader(dataset, BATCH, "cpu", seed=0)
        ),
        "WorkerAugmentLoader (crop+flip+AutoAugment, 2 workers)": endless(
            WorkerAugmentLoader(dataset, BATCH, "cpu", seed=0, workers=2)
        ),
    }
    timings: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, iterable in pipelines.items():
            timings[name].append(seconds_per_batch(iterable, args.batches))
    classic_ms = statistics.median(timings[next(iter(pipelines))]) * 1e3
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    )
    print(f"# batch {BATCH}, {args.samples} images 3x32x32, {args.rounds} rounds x {args.batches} batches")
    print("| pipeline | ms per batch of 64 (median of rounds) | min-max over rounds | speed-up vs classic |")
    print("|---|---|---|---|")
    for name, values in timings.items():
        ms = [v * 1e3 for v in values]
        median = statistics.median(ms)
        print(f"| {name} | {median:.2f} | {min(ms):.2f}-{max(ms):.2f} | {classic_ms / median:.2f}x |")


if __name__ == "__main__":
    main()
