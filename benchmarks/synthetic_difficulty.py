"""Is the synthetic dataset a real distillation problem? Train CNNs of different capacity on it and measure.

For a demo-size instance (20 classes in 5 superclasses, 200 train / 100 test images per class,
16x16) it reports each network's test accuracy, its mean logit gap z_t - max_{i != t} z_i as a
teacher (unaugmented training and test sets) and the share of its non-target probability that
falls on sibling classes; with --distill, the student trained with CE alone vs CE + DKD from the
teacher. Trains on the CPU with the device-resident loader (crop + flip), SGD + one-cycle.

    python benchmarks/synthetic_difficulty.py --distill                  # the demo-size measurement
    python benchmarks/synthetic_difficulty.py --image-size 32 --seed 1 --distill
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_tune.core.losses import dkd_loss
from dkd_tune.data import DeviceAugmentLoader, EvalLoader, load_train_test, parse_data_spec

# name -> (stage widths, conv blocks per stage)
NETWORKS = {
    "tiny": ((8, 16), 1),
    "small": ((16, 32, 64), 1),
    "large": ((32, 64, 128), 2),
}


def cnn(widths: tuple[int, ...], blocks: int, classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for stage, width in enumerate(widths):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def train(model, train_set, epochs, seed, teacher=None, alpha=1.0, beta=8.0, temperature=4.0, warmup=2):
    loader = DeviceAugmentLoader(train_set, 128, "cpu", seed=seed, drop_last=True)
    steps = epochs * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, pct_start=0.25)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            logits = model(batch.images)
            loss = F.cross_entropy(logits, batch.labels)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(batch.images)
                ramp = min(1.0, (epoch + 1) / warmup)
                loss = loss + ramp * dkd_loss(logits, teacher_logits, batch.labels, alpha, beta, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, dataset, temperature=4.0):
    """Over `dataset`, unaugmented: (accuracy %, mean logit gap z_t - max_{i != t} z_i, sibling share %).

    The sibling share is the part of the non-target probability mass (at the distillation
    temperature) that falls on the target's siblings (same superclass): the class-similarity
    information NCKD transfers. A teacher without it would spread the mass uniformly.
    """
    correct, gaps, shares = 0, [], []
    superclass_of = torch.zeros(dataset.num_classes, dtype=torch.int64)
    superclass_of[dataset.labels] = dataset.coarse_labels
    for batch in EvalLoader(dataset, 512, "cpu"):
        logits = model(batch.images)
        correct += int((logits.argmax(1) == batch.labels).sum())
        target = logits.gather(1, batch.labels[:, None]).squeeze(1)
        others = logits.scatter(1, batch.labels[:, None], -math.inf).amax(1)
        gaps.append(target - others)
        probabilities = torch.softmax(logits / temperature, dim=1).scatter(1, batch.labels[:, None], 0.0)
        sibling = superclass_of[None, :] == superclass_of[batch.labels][:, None]
        shares.append((probabilities * sibling).sum(1) / probabilities.sum(1))
    return (
        100.0 * correct / len(dataset),
        float(torch.cat(gaps).mean()),
        100.0 * float(torch.cat(shares).mean()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--superclasses", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--networks", default="tiny,small,large")
    parser.add_argument(
        "--distill", action="store_true", help="also train the first network with DKD from the last"
    )
    parser.add_argument("--betas", default="1,8", help="comma-separated DKD beta values for --distill")
    parser.add_argument("--student", default="small", choices=sorted(NETWORKS), help="student for --distill")
    parser.add_argument("--teacher", default="large", choices=sorted(NETWORKS), help="teacher for --distill")
    parser.add_argument("--data", type=Path, help="folder for the generated data (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generate = {
        "classes": args.classes,
        "superclasses": args.superclasses,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "image_size": args.image_size,
        "seed": args.seed,
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch)
        started = time.perf_counter()
        train_set, test_set = load_train_test(
            parse_data_spec({"name": "synthetic", "root": str(root), "generate": generate})
        )
        print(f"generated+loaded {generate} in {time.perf_counter() - started:.1f} s")
    siblings = args.classes // args.superclasses - 1
    print(f"uniform sibling share: {100 * siblings / (args.classes - 1):.1f} % of the non-target mass")
    print(
        f"{'network':8} {'params':>8} {'train s':>8} {'test acc %':>10} {'gap train':>10} {'gap test':>9} "
        f"{'sibling share % (train, T=4)':>29}"
    )
    trained = {}
    for name in args.networks.split(","):
        widths, blocks = NETWORKS[name]
        torch.manual_seed(args.seed)
        model = cnn(widths, blocks, train_set.num_classes)
        started = time.perf_counter()
        train(model, train_set, args.epochs, args.seed)
        seconds = time.perf_counter() - started
        accuracy, gap_test, _ = evaluate(model, test_set)
        _, gap_train, share = evaluate(model, train_set)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:8} {params:8d} {seconds:8.1f} {accuracy:10.1f} {gap_train:10.2f} {gap_test:9.2f} {share:29.1f}",
            flush=True,
        )
        trained[name] = model
    if args.distill:
        student_name, teacher_name = args.student, args.teacher
        baseline, _, _ = evaluate(trained[student_name], test_set)
        print(f"{student_name} student, teacher {teacher_name}: CE only {baseline:.1f} %")
        widths, blocks = NETWORKS[student_name]
        for beta in (float(b) for b in args.betas.split(",")):
            torch.manual_seed(args.seed)
            student = cnn(widths, blocks, train_set.num_classes)
            train(student, train_set, args.epochs, args.seed, teacher=trained[teacher_name], beta=beta)
            accuracy, _, _ = evaluate(student, test_set)
            print(
                f"  CE + DKD (alpha 1, beta {beta:g}, T 4): {accuracy:.1f} % ({accuracy - baseline:+.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
