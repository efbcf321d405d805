"""40-epoch linear probe of wrn_16_2: cached features vs re-running the frozen backbone every epoch, on CPU.

    python benchmarks/probe.py [--train 1500 --test 500 --rounds 3 --threads 2]

Cached (what `dkd-tune probe` does): one backbone pass over each split, then 40 epochs of the
linear head on the (N, 128) feature tensors (`dkd_tune.probe.probe_model`). Reference: the
naive loop, which runs the frozen backbone on every training mini-batch of every epoch and over
the test set after every epoch for its accuracy (same head, same seeded initialisation and
shuffles, same protocol). Images are generated (class colour + stripes + noise) at 32x32; the
backbone is an untrained wrn_16_2 in eval mode (its cost does not depend on its weights).
The cached path is timed `--rounds` times (median); the reference, which takes 40 backbone
passes, once. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_tune.data import EvalLoader, ImageDataset
from dkd_tune.data.dataset import CIFAR100_MEAN, CIFAR100_STD
from dkd_tune.data.views import normalize
from dkd_tune.models import create_model
from dkd_tune.probe import PAPER_PROTOCOL, linear_head, probe_model, top1_accuracy

NUM_CLASSES = 10
SIDE = 32


def generated_set(count: int, seed: int) -> ImageDataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, count)
    palette = np.random.default_rng(7).integers(30, 226, (NUM_CLASSES, 3))
    rows = np.arange(SIDE)[:, None, None]
    stripes = np.where((rows // (2 + labels[:, None, None, None] % 5)) % 2 == 0, 40.0, -40.0)
    pixels = palette[labels][:, None, None, :] + stripes + rng.normal(0, 12, (count, SIDE, SIDE, 3))
    images = torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2).copy())
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=NUM_CLASSES,
        class_names=[f"class_{i}" for i in range(NUM_CLASSES)],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        name="generated",
    )


def probe_rerunning_backbone(model, train_set: ImageDataset, test_set: ImageDataset, seed: int = 0):
    """The protocol without the cache: the frozen backbone runs on every batch of every epoch."""
    protocol = PAPER_PROTOCOL
    generator = torch.Generator().manual_seed(seed)
    head = linear_head(model.num_features, train_set.num_classes, generator)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
    )
    model.eval()
    epoch_seconds, backbone_seconds, test_acc = [], 0.0, 0.0
    for epoch in range(protocol.epochs):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = protocol.lr_at(epoch)
        order = torch.randperm(len(train_set), generator=generator)
        for start in range(0, len(train_set), protocol.batch_size):
            rows = order[start : start + protocol.batch_size]
            backbone_started = time.perf_counter()
            with torch.no_grad():
                features = model.forward_features(
                    normalize(train_set.images[rows], train_set.mean, train_set.std)
                )
            backbone_seconds += time.perf_counter() - backbone_started
            loss = F.cross_entropy(head(features), train_set.labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        backbone_started = time.perf_counter()
        with torch.no_grad():
            test_features = torch.cat(
                [model.forward_features(batch.images) for batch in EvalLoader(test_set, 512, "cpu")]
            )
        backbone_seconds += time.perf_counter() - backbone_started
        test_acc = top1_accuracy(head, test_features, test_set.labels)
        epoch_seconds.append(time.perf_counter() - started)
    return epoch_seconds, backbone_seconds, test_acc


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1500, help="Generated training images.")
    parser.add_argument("--test", type=int, default=500, help="Generated test images.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed runs of the cached path.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("wrn_16_2", NUM_CLASSES).eval()
    train_set, test_set = generated_set(args.train, seed=1), generated_set(args.test, seed=2)
    load_before = os.getloadavg()

    cached_totals, cached_extract, cached_head, cached_acc = [], [], [], 0.0
    for _ in range(args.rounds):
        started = time.perf_counter()
        result = probe_model(model, train_set, test_set, device="cpu", seed=0)
        cached_totals.append(time.perf_counter() - started)
        cached_extract.append(result.extract_seconds)
        cached_head.append(result.train_seconds)
        cached_acc = result.test_acc
    epoch_seconds, reference_backbone, reference_acc = probe_rerunning_backbone(
        model, train_set, test_set, seed=0
    )
    load_after = os.getloadavg()

    reference_total = sum(epoch_seconds)
    cached_total = statistics.median(cached_totals)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        f"command: python benchmarks/probe.py --train {args.train} --test {args.test} --rounds {args.rounds} --threads {args.threads}"
    )
    print(f"date: {time.strftime('%Y-%m-%d')}")
    print()
    print("| path | 40-epoch probe (s) | of which backbone | final test top-1 |")
    print("|---|---|---|---|")
    print(
        f"| cached features (median of {args.rounds}) | {cached_total:.1f} | "
        f"{statistics.median(cached_extract):.1f} (one pass per split) | {cached_acc:.2f}% |"
    )
    print(
        f"| re-run backbone every epoch (1 run) | {reference_total:.1f} | "
        f"{reference_backbone:.1f} (40 passes; median epoch {statistics.median(epoch_seconds):.2f} s) | {reference_acc:.2f}% |"
    )
    print()
    print(
        f"speed-up: {reference_total / cached_total:.1f}x; head alone (cached) median {statistics.median(cached_head):.2f} s "
        f"for 40 epochs on {args.train} x {model.num_features} features"
    )


if __name__ == "__main__":
    main()
