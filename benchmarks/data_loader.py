"""Cost per batch of 64 of the device-resident loader vs the classic PIL + DataLoader pipeline, on CPU.

    python benchmarks/data_loader.py [--batches 150 --rounds 5 --threads 1]

Classic: CIFAR-style dataset of PIL images with torchvision's RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor and Normalize in a DataLoader with 2 workers (the usual CIFAR
recipe, `benchmarks.workloads.classic_loader`). Device: `DeviceAugmentLoader` on the CPU (the
same crop/flip distribution). Also: the AutoAugment worker path. Each round measures every
pipeline once (interleaved, so background load hits all alike); the table reports medians over
rounds of the mean time per batch of a round, after a warm-up (worker start-up excluded).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import cpu_name, interleaved_rounds, median
from benchmarks.workloads import BATCH, classic_loader, endless, random_image_dataset
from dkd_tune.data import DeviceAugmentLoader, WorkerAugmentLoader

WARMUP_BATCHES = 10


def seconds_per_batch(iterator, batches: int) -> float:
    """Mean seconds per batch over `batches` batches, consuming each batch's images."""
    started = time.perf_counter()
    for _ in range(batches):
        images = next(iterator)[0]
        images.sum()  # touch the result, as a training step would
    return (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150, help="timed batches per pipeline per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--samples", type=int, default=50_000, help="training-set size (CIFAR-100: 50,000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = random_image_dataset(args.samples)
    pipelines = {
        "classic: PIL + RandomCrop/Flip/ToTensor/Normalize, DataLoader 2 workers": endless(
            classic_loader(dataset, BATCH, workers=2)
        ),
        "DeviceAugmentLoader (crop+flip+normalise, batched, CPU)": endless(
            DeviceAugmentLoader(dataset, BATCH, "cpu", seed=0)
        ),
        "WorkerAugmentLoader (crop+flip+AutoAugment, 2 workers)": endless(
            WorkerAugmentLoader(dataset, BATCH, "cpu", seed=0, workers=2)
        ),
    }
    for iterator in pipelines.values():  # warm-up: workers started, first batches made
        seconds_per_batch(iterator, WARMUP_BATCHES)
    timings, _ = interleaved_rounds(
        {
            name: (lambda it=iterator: seconds_per_batch(it, args.batches))
            for name, iterator in pipelines.items()
        },
        args.rounds,
    )
    classic_ms = median(timings[next(iter(pipelines))]) * 1e3
    print(f"# {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"# batch {BATCH}, {args.samples} images 3x32x32, {args.rounds} rounds x {args.batches} batches")
    print("| pipeline | ms per batch of 64 (median of rounds) | min-max over rounds | speed-up vs classic |")
    print("|---|---|---|---|")
    for name, values in timings.items():
        ms = [v * 1e3 for v in values]
        print(f"| {name} | {median(ms):.2f} | {min(ms):.2f}-{max(ms):.2f} | {classic_ms / median(ms):.2f}x |")


if __name__ == "__main__":
    main()
