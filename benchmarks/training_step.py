"""DKD training throughput (images/s, batch 64): the reference loop, dkd-tune's loop (live teacher, logit cache), the bare student step.

    python benchmarks/training_step.py                       # CPU, three pairs; updates docs/benchmarks.md
    python benchmarks/training_step.py --device cuda         # GPU: dkd-tune with bf16 + channels_last + compile
    python benchmarks/training_step.py --device cpu --tiny   # seconds: checks that the script runs

Loops, each on the same random CIFAR-shaped images (100 classes, 32x32) and random weights:

(a) reference: what common DKD code bases run. A map-style dataset of PIL images with
    torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize in a
    DataLoader with 2 workers; the teacher's forward pass every step; fp32; DKD computed from
    probabilities with masks and a -1000 logit offset; the loss and top-1/top-5 read back every
    step for the progress meters. Written here, not imported.
(b) dkd-tune, live teacher: `engine.loop.fit` for one epoch over the subset, its `DeviceAugmentLoader`
    and `LiveTeacher`; the figure is the epoch's own `images_per_s` (training batches only).
(c) dkd-tune, logit cache: the same with `TeacherLogitCache` (memory-mapped, every image's 162
    views; built with a stand-in teacher, see benchmarks/workloads.py).
(d) floor: the bare student step (forward, cross-entropy, backward, SGD step) on one fixed
    tensor batch already on the device. No loop can beat it.

On CUDA, (b)-(d) use `Acceleration.for_device` (bf16 autocast, channels_last, torch.compile,
TF32, cuDNN benchmark); (a) stays fp32 as the reference code bases run it. Each round runs
`--batches` batches of every loop, in an order rotated each round; the table gives medians over
rounds and ratios of medians from the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import (  # noqa: E402
    Throughput,
    add_output_arguments,
    cpu_seconds,
    interleaved_rounds,
    load_average,
    machine_description,
    markdown_target,
    median,
    spread,
    synchronize,
    today,
    write_section,
)
from benchmarks.workloads import (  # noqa: E402
    classic_loader,
    endless,
    random_image_dataset,
    standin_logit_cache,
)
from dkd_tune.core.recipes import Recipe, resolve_recipe  # noqa: E402
from dkd_tune.data import DeviceAugmentLoader, ImageDataset  # noqa: E402
from dkd_tune.engine.acceleration import Acceleration  # noqa: E402
from dkd_tune.engine.loop import LiveTeacher, fit  # noqa: E402
from dkd_tune.engine.run_setup import RunIdentity  # noqa: E402
from dkd_tune.models import create_model  # noqa: E402

PAIRS = (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"))
LOOPS = {
    "reference": "(a) reference: PIL + DataLoader(2 workers), live teacher, fp32",
    "live": "(b) dkd-tune `fit`, live teacher",
    "cache": "(c) dkd-tune `fit`, logit cache",
    "floor": "(d) floor: bare student step on a fixed batch",
}
SECTION_CPU = "## DKD training throughput: reference loop vs dkd-tune vs the bare student step (CPU)"
SECTION_GPU = "## DKD training throughput on a GPU (bf16, channels_last, compile)"


# --------------------------------------------------------------------------------------------
# (a) The reference loop


def reference_dkd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """DKD the way the common code bases compute it: softmax probabilities, boolean masks, a -1000 offset."""
    target_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = ~target_mask
    p_student = F.softmax(logits_student / temperature, dim=1)
    p_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def two_bins(probabilities: torch.Tensor) -> torch.Tensor:
        return torch.stack([(probabilities * target_mask).sum(1), (probabilities * other_mask).sum(1)], dim=1)

    scale = temperature**2 / target.shape[0]
    tckd = F.kl_div(torch.log(two_bins(p_student)), two_bins(p_teacher), reduction="sum") * scale
    offset = 1000.0 * target_mask
    nckd = (
        F.kl_div(
            F.log_softmax(logits_student / temperature - offset, dim=1),
            F.softmax(logits_teacher / temperature - offset, dim=1),
            reduction="sum",
        )
        * scale
    )
    return alpha * tckd + beta * nckd


class ReferenceLoop:
    """Steps of the reference loop: classic loader, teacher forward, fp32 student step, per-step meters."""

    def __init__(
        self, student, teacher, dataset: ImageDataset, recipe: Recipe, device: torch.device, batch: int
    ):
        self.student = student.to(device).train()
        self.teacher = teacher.to(device).eval()
        self.recipe, self.device = recipe, device
        self.optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
        self.batches = endless(classic_loader(dataset, batch, workers=2, pin_memory=device.type == "cuda"))
        self.meters = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0}

    def step(self) -> None:
        images, labels = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.no_grad():
            logits_teacher = self.teacher(images)
        logits_student = self.student(images)
        recipe = self.recipe
        loss = recipe.ce_weight * F.cross_entropy(logits_student, labels) + recipe.warmup_factor_at(
            0
        ) * reference_dkd_loss(
            logits_student, logits_teacher, labels, recipe.alpha, recipe.beta, recipe.temperature
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        top5 = logits_student.detach().topk(5, dim=1).indices == labels.unsqueeze(1)
        self.meters["loss"] += loss.item() * labels.numel()
        self.meters["top1"] += top5[:, 0].sum().item()
        self.meters["top5"] += top5.any(dim=1).sum().item()
        self.meters["count"] += labels.numel()

    def throughput(self, batches: int, batch: int) -> Throughput:
        cpu_start, start = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            self.step()
        synchronize(self.device)
        return Throughput(batches * batch, time.perf_counter() - start, cpu_seconds() - cpu_start)


# --------------------------------------------------------------------------------------------
# (b), (c) dkd-tune's loop and (d) the floor


def fit_throughput(student, loader, recipe: Recipe, teacher, device, acceleration) -> Throughput:
    """One epoch of `engine.loop.fit` over `loader`: its own epoch time (training batches, evaluation excluded).

    The CPU time covers the whole call (also `fit`'s few milliseconds of set-up).
    """
    cpu_start = cpu_seconds()
    result = fit(
        student,
        loader,
        [],
        recipe,
        identity=RunIdentity(arch="student", num_classes=loader.dataset.num_classes),
        loss_mode="dkd",
        teacher=teacher,
        device=device,
        acceleration=acceleration,
    )
    epoch = result.history[-1]
    images = round(epoch["images_per_s"] * epoch["epoch_time_s"])
    return Throughput(images, epoch["epoch_time_s"], cpu_seconds() - cpu_start)


def synchronizations_per_epoch(student, loader, recipe: Recipe, teacher, device, acceleration) -> int:
    """How many times one epoch of `fit` made the host wait for the GPU (CUDA's sync debug mode counts them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit_throughput(student, loader, recipe, teacher, device, acceleration)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


class FloorStep:
    """The bare student step on one fixed batch, with the same acceleration as dkd-tune's loop."""

    def __init__(self, student, batch, recipe: Recipe, device: torch.device, acceleration: Acceleration):
        self.student, self.device, self.acceleration = student, device, acceleration
        self.model = torch.compile(student) if acceleration.compile else student
        self.images, self.labels = batch.images.clone(), batch.labels.clone()
        self.recipe = recipe

    def throughput(self, batches: int) -> Throughput:
        optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=self.recipe.lr,
            momentum=self.recipe.momentum,
            weight_decay=self.recipe.weight_decay,
        )
        self.model.train()
        synchronize(self.device)
        cpu_start, start = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            with self.acceleration.autocast(self.device):
                loss = F.cross_entropy(self.model(self.images).float(), self.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(self.device)
        return Throughput(
            batches * self.labels.numel(), time.perf_counter() - start, cpu_seconds() - cpu_start
        )


# --------------------------------------------------------------------------------------------
# One pair


def subset(dataset: ImageDataset, count: int) -> ImageDataset:
    return dataclasses.replace(dataset, images=dataset.images[:count], labels=dataset.labels[:count])


def measure_pair(teacher_name: str, student_name: str, args, device: torch.device, workdir: Path) -> dict:
    batch = args.batch
    dataset = random_image_dataset(args.batches * batch, num_classes=args.classes, image_size=args.image_size)
    warmup_set = subset(dataset, args.warmup_batches * batch)
    acceleration = Acceleration.for_device(device, compile=args.compile)
    torch.manual_seed(0)
    teacher = create_model(teacher_name, args.classes).eval()
    student = create_model(student_name, args.classes)
    recipe = dataclasses.replace(
        resolve_recipe("cifar100", student=student_name, teacher=teacher_name), epochs=1, batch_size=batch
    )
    reference = ReferenceLoop(copy.deepcopy(student), copy.deepcopy(teacher), dataset, recipe, device, batch)

    cache = standin_logit_cache(dataset, workdir / f"{teacher_name}-{student_name}", device).to(device)
    memory_format = torch.channels_last if acceleration.channels_last else torch.preserve_format
    live = LiveTeacher(teacher.to(device, memory_format=memory_format))
    student = student.to(device, memory_format=memory_format)

    def loader(data: ImageDataset) -> DeviceAugmentLoader:
        return DeviceAugmentLoader(
            data,
            batch,
            device,
            seed=0,
            drop_last=True,
            channels_last=acceleration.channels_last,
            dtype=acceleration.input_dtype,
        )

    train_loader, warmup_loader = loader(dataset), loader(warmup_set)
    floor = FloorStep(student, next(iter(loader(dataset))), recipe, device, acceleration)

    # Warm-up (untimed): workers started, first-call allocations made, torch.compile done.
    reference.throughput(args.warmup_batches, batch)
    for source in (live, cache):
        fit_throughput(student, warmup_loader, recipe, source, device, acceleration)
    floor.throughput(args.warmup_batches)

    contenders = {
        "reference": lambda: reference.throughput(args.batches, batch),
        "live": lambda: fit_throughput(student, train_loader, recipe, live, device, acceleration),
        "cache": lambda: fit_throughput(student, train_loader, recipe, cache, device, acceleration),
        "floor": lambda: floor.throughput(args.batches),
    }
    syncs = None
    if device.type == "cuda":
        syncs = synchronizations_per_epoch(student, train_loader, recipe, cache, device, acceleration)
    pair = f"{teacher_name} -> {student_name}"
    results, loads = interleaved_rounds(
        contenders, args.rounds, progress=lambda line: print(f"{pair}: {line}", flush=True)
    )
    wall = {name: [value.per_s for value in values] for name, values in results.items()}
    cpu = {name: [value.per_cpu_s for value in values] for name, values in results.items()}
    medians = {name: median(values) for name, values in wall.items()}
    cpu_medians = {name: median(values) for name, values in cpu.items()}

    def ratios(figures: dict[str, float]) -> dict[str, float]:
        return {
            "cache_vs_reference": figures["cache"] / figures["reference"],
            "live_vs_reference": figures["live"] / figures["reference"],
            "cache_vs_floor": figures["cache"] / figures["floor"],
            "floor_vs_reference": figures["floor"] / figures["reference"],
        }

    return {
        "pair": pair,
        "images_per_s": medians,
        "images_per_cpu_s": cpu_medians,
        "all_rounds": wall,
        "all_rounds_cpu": cpu,
        "loads": loads,
        "ratios": ratios(medians),
        "cpu_ratios": ratios(cpu_medians),
        "synchronizations_per_epoch": syncs,
        "batches_per_epoch": len(train_loader),
    }


# --------------------------------------------------------------------------------------------
# Report


def command_line(args) -> str:
    parts = ["python benchmarks/training_step.py"]
    if args.tiny:
        return parts[0] + " --device cpu --tiny"
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    defaults = {"threads": 1, "rounds": 5, "batches": 100 if args.device.startswith("cuda") else 8}
    for name, default in defaults.items():
        if getattr(args, name) != default:
            parts.append(f"--{name} {getattr(args, name)}")
    if args.pairs:
        parts.append("--pairs " + " ".join(args.pairs))
    return " ".join(parts)


def report(rows: list[dict], args, device: torch.device, load_before: float) -> str:
    on_gpu = device.type == "cuda"
    loads = [load for row in rows for load in row["loads"]]
    lines = [
        SECTION_GPU if on_gpu else SECTION_CPU,
        "",
        f"- Machine: {machine_description(device)}; torch threads: {args.threads}"
        + (
            ""
            if on_gpu
            else f" (the reference loop's 2 DataLoader worker processes run beside them on the same {os.cpu_count()} cores)"
        )
        + f"; 1-minute load average {load_before:.2f} before, {min(loads):.2f}-{max(loads):.2f} over the rounds.",
        f"- Date: {today()}.",
        f"- Command: `{command_line(args)}`.",
        f"- Setup: batch {args.batch}, {args.classes} classes, {args.image_size}x{args.image_size} random images"
        f" and random weights; {args.rounds} interleaved rounds of {args.batches} batches per loop after"
        f" {args.warmup_batches} warm-up batches; images/s are medians over rounds (min-max in brackets).",
        "",
        "| pair | (a) reference | (b) dkd-tune, live teacher | (c) dkd-tune, logit cache | (d) floor |"
        " (c)/(a) | (b)/(a) | (c)/(d) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ips, ratio = row["images_per_s"], row["ratios"]
        cells = [f"{ips[name]:.4g} ({spread(row['all_rounds'][name])})" for name in LOOPS]
        lines.append(
            f"| {row['pair']} | "
            + " | ".join(cells)
            + f" | **{ratio['cache_vs_reference']:.2f}x** | **{ratio['live_vs_reference']:.2f}x**"
            f" | **{100 * ratio['cache_vs_floor']:.0f}%** |"
        )
    if on_gpu:
        lines += [
            "",
            "Host-device synchronisations in one epoch of (c), counted by"
            " `torch.cuda.set_sync_debug_mode('warn')`: "
            + ", ".join(
                f"{row['pair']}: {row['synchronizations_per_epoch']} in {row['batches_per_epoch']} steps"
                for row in rows
            )
            + ".",
        ]
    else:
        lines += [
            "",
            "The same loops in images per CPU-second (CPU time of the benchmark process and, for (a), of its"
            " DataLoader workers): other jobs on the machine disturb it less than wall-clock time.",
            "",
            "| pair | (a) | (b) | (c) | (d) | (c)/(a) | (b)/(a) | (c)/(d) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            ips, ratio = row["images_per_cpu_s"], row["cpu_ratios"]
            lines.append(
                f"| {row['pair']} | "
                + " | ".join(f"{ips[name]:.4g}" for name in LOOPS)
                + f" | {ratio['cache_vs_reference']:.2f}x | {ratio['live_vs_reference']:.2f}x"
                f" | {100 * ratio['cache_vs_floor']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the benchmark process")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--batches", type=int, help="timed batches per loop per round (default: 8 on the CPU, 100 on CUDA)"
    )
    parser.add_argument("--warmup-batches", type=int, help="untimed batches first (default: 2 CPU, 20 CUDA)")
    parser.add_argument("--pairs", nargs="+", help="teacher:student pairs (default: the three of issue 12)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: on for CUDA)",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.batch, args.classes, args.image_size = 64, 100, 32
    args.batches = args.batches or (100 if on_gpu else 8)
    args.warmup_batches = args.warmup_batches or (20 if on_gpu else 2)
    pairs = [tuple(pair.split(":")) for pair in args.pairs] if args.pairs else list(PAIRS)
    if args.tiny:
        args.batch, args.classes, args.image_size = 16, 10, 16
        args.rounds, args.batches, args.warmup_batches = 2, 2, 1
        pairs = [("resnet8", "resnet8")]
    torch.set_num_threads(args.threads)
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dkd-training-step-bench-") as workdir:
        for teacher_name, student_name in pairs:
            rows.append(measure_pair(teacher_name, student_name, args, device, Path(workdir)))
            # Written after every pair, so a run cut short by a time limit keeps what it measured.
            section = report(rows, args, device, load_before)
            if args.json:
                args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
            if markdown_target(args) is not None:
                write_section(markdown_target(args), SECTION_GPU if on_gpu else SECTION_CPU, section)
    print(section)
    if markdown_target(args) is not None:
        print(f"wrote {markdown_target(args)}")


if __name__ == "__main__":
    main()
