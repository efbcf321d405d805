"""Aggregate trial throughput with 1, 2, 4 and 8 concurrent trials on one GPU (torch + dkd_tune core only, no Ray).

    python benchmarks/gpu_packing.py                         # CUDA; updates docs/benchmarks.md
    python benchmarks/gpu_packing.py --device cpu --tiny     # seconds: checks that the script runs

A search packs trials on a GPU by giving each a fraction of it (`resources.gpu: 0.125` puts eight
on one GPU); each trial is its own process. This benchmark does the same without Ray: it starts
`max(--counts)` worker processes (multiprocessing, spawn), each of which holds the same random
CIFAR-shaped data and runs `trial.run_trial` (device-resident loader, the teacher-logit cache
moved to the GPU, resnet8x4 student with bf16 + channels_last + torch.compile, evaluation and a
checkpoint every epoch) when told to. For each count N, N workers start a trial; after its first
epoch (warm-up: compilation, first allocations) each trial waits at a barrier, so the N trials'
timed epochs run together. Aggregate throughput = all images the N trials trained in their timed
epochs / (last trial's end - barrier release). The CPU cores are split evenly between the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import (  # noqa: E402
    add_output_arguments,
    load_average,
    machine_description,
    markdown_target,
    today,
    write_section,
)

SECTION = "## GPU packing: aggregate throughput of 1, 2, 4 and 8 concurrent trials on one GPU"
# Packing stops paying once one more doubling of trials adds less than this to the aggregate throughput.
WORTHWHILE_GAIN = 1.10


@dataclasses.dataclass(frozen=True)
class PackingSetup:
    device: str
    images: int
    test_images: int
    image_size: int
    batch: int
    warmup_epochs: int
    timed_epochs: int
    student: str
    teacher: str
    teacher_checkpoint: str
    cache_path: str
    threads: int
    compile: bool | None


def worker(rank: int, setup: PackingSetup, tasks, results, barriers) -> None:
    """One trial process: holds the data, runs a trial for each count it is sent, reports its timed epochs."""
    import torch

    from benchmarks.workloads import random_image_dataset
    from dkd_tune.core.recipes import resolve_recipe
    from dkd_tune.data.shared import SharedDataset
    from dkd_tune.teacher.preparation import TeacherArtifacts
    from dkd_tune.trial import TrialPlan, run_trial

    torch.set_num_threads(setup.threads)
    if setup.compile is not False:
        import torch._inductor.config

        # Eight workers compiling at once would each start a compile pool of every core.
        torch._inductor.config.compile_threads = setup.threads
    device = torch.device(setup.device)
    data = SharedDataset.from_datasets(
        random_image_dataset(setup.images, image_size=setup.image_size, seed=0),
        random_image_dataset(setup.test_images, image_size=setup.image_size, seed=1),
    )
    epochs = setup.warmup_epochs + setup.timed_epochs
    recipe = dataclasses.replace(
        resolve_recipe("cifar100", student=setup.student, teacher=setup.teacher),
        epochs=epochs,
        batch_size=setup.batch,
        warmup_epochs=epochs,
    )
    plan = TrialPlan(
        student=setup.student,
        num_classes=100,
        dataset_name="random",
        augment="standard",
        loss_mode="dkd",
        base_recipe=recipe,
        teacher=TeacherArtifacts(
            label="teacher",
            model=setup.teacher,
            checkpoint=setup.teacher_checkpoint,
            num_classes=100,
            gap=None,
            cache_path=setup.cache_path,
        ),
        max_epochs=epochs,
        compile=setup.compile,
        cpus_per_trial=setup.threads,
    )
    results.put(("ready", rank))
    while (count := tasks.get()) is not None:
        marks: dict[str, float] = {}

        def reporter(report, count=count, marks=marks) -> None:
            if report.epoch == setup.warmup_epochs:
                barriers[count].wait()
                marks["start"] = time.time()
            elif report.epoch == epochs:
                marks["end"] = time.time()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory(prefix="dkd-packing-trial-") as workdir:
            result = run_trial(plan, data, {}, reporter=reporter, checkpoint_dir=Path(workdir), device=device)
        timed = result.history[setup.warmup_epochs :]
        results.put(
            (
                "done",
                {
                    "rank": rank,
                    "count": count,
                    "start": marks["start"],
                    "end": marks["end"],
                    "images": sum(setup.images for _ in timed),
                    "train_images_per_s": [epoch["images_per_s"] for epoch in timed],
                    "epoch_time_s": [epoch["epoch_time_s"] for epoch in timed],
                    "cuda_max_allocated": torch.cuda.max_memory_allocated(device)
                    if device.type == "cuda"
                    else 0,
                },
            )
        )


def measure(args, setup_for) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    most = max(args.counts)
    setup = setup_for(most)
    barriers = {count: context.Barrier(count) for count in args.counts}
    tasks = [context.Queue() for _ in range(most)]
    results = context.Queue()
    processes = [
        context.Process(target=worker, args=(rank, setup, tasks[rank], results, barriers), daemon=True)
        for rank in range(most)
    ]
    for process in processes:
        process.start()
    rows = []
    try:
        for _ in range(most):
            receive(results, processes, args.timeout)
        for count in args.counts:
            print(f"{count} concurrent trial(s) ...", flush=True)
            for rank in range(count):
                tasks[rank].put(count)
            finished = []
            for _ in range(count):
                finished.append(receive(results, processes, args.timeout)[1])
            start = min(row["start"] for row in finished)
            end = max(row["end"] for row in finished)
            images = sum(row["images"] for row in finished)
            rows.append(
                {
                    "count": count,
                    "aggregate_images_per_s": images / (end - start),
                    "per_trial_images_per_s": [
                        row["images"] / (row["end"] - row["start"]) for row in finished
                    ],
                    "seconds": end - start,
                    "cuda_max_allocated": max(row["cuda_max_allocated"] for row in finished),
                    "trials": finished,
                }
            )
            print(f"  aggregate {rows[-1]['aggregate_images_per_s']:.0f} images/s", flush=True)
    finally:
        for queue in tasks:
            queue.put(None)
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    return rows


def receive(results, processes, timeout: float):
    """The next message from the workers; fails as soon as one of them has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [process for process in processes if process.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"trial worker {dead[0].name} exited with {dead[0].exitcode}") from None
    raise TimeoutError(f"no trial worker reported within {timeout:.0f} s")


def chosen_default(rows: list[dict]) -> int:
    """The most trials per GPU before one more doubling adds less than WORTHWHILE_GAIN to the aggregate."""
    rows = sorted(rows, key=lambda row: row["count"])
    best = rows[0]
    for row in rows[1:]:
        if row["aggregate_images_per_s"] < WORTHWHILE_GAIN * best["aggregate_images_per_s"]:
            break
        best = row
    return best["count"]


def report(rows: list[dict], args, load_before: float) -> str:
    single = next(row for row in rows if row["count"] == min(args.counts))["aggregate_images_per_s"]
    default = chosen_default(rows)
    lines = [
        SECTION,
        "",
        f"- Machine: {machine_description(args.device)}; load average {load_before:.2f} before.",
        f"- Date: {today()}.",
        f"- Command: `python benchmarks/gpu_packing.py{'' if args.device == 'cuda' else ' --device ' + args.device}`.",
        f"- Trials: {args.teacher} -> {args.student}, DKD with the teacher-logit cache, batch {args.batch},"
        f" {args.images:,} random {args.image_size}x{args.image_size} training images and {args.test_images:,}"
        f" test images each, {args.warmup_epochs} warm-up epoch(s) then {args.timed_epochs} timed epochs"
        " (training + evaluation + checkpoint each); bf16 + channels_last + compile as `Acceleration.for_device`.",
        "",
        "| trials per GPU | aggregate images/s | vs 1 trial | per trial images/s (median) | peak CUDA memory per trial (MiB) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        per_trial = sorted(row["per_trial_images_per_s"])[len(row["per_trial_images_per_s"]) // 2]
        lines.append(
            f"| {row['count']} | {row['aggregate_images_per_s']:.0f} | {row['aggregate_images_per_s'] / single:.2f}x"
            f" | {per_trial:.0f} | {row['cuda_max_allocated'] / 2**20:.0f} |"
        )
    lines += [
        "",
        f"Default chosen from these figures: **{default} trial(s) per GPU** (`resources.gpu: {1 / default:g}`),"
        f" the most before one more doubling adds less than {100 * (WORTHWHILE_GAIN - 1):.0f}% aggregate throughput.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--images", type=int, default=20_000, help="training images per trial")
    parser.add_argument("--timed-epochs", type=int, default=3)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: on for CUDA)",
    )
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds to wait for any one step")
    add_output_arguments(parser)
    args = parser.parse_args()
    args.batch, args.image_size, args.test_images, args.warmup_epochs = 64, 32, 1000, 1
    args.student, args.teacher = "resnet8x4", "resnet32x4"
    if args.tiny:
        args.counts, args.images, args.timed_epochs = [1, 2], 64, 1
        args.batch, args.image_size, args.test_images = 16, 8, 32
        args.student, args.teacher = "resnet8", "resnet8"

    from benchmarks.workloads import random_image_dataset, random_teacher_checkpoint, standin_logit_cache

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="dkd-packing-bench-") as workdir:
        workdir = Path(workdir)
        checkpoint = random_teacher_checkpoint(workdir / "teacher.pt", args.teacher, 100, args.image_size)
        print("building the teacher-logit cache ...", flush=True)
        cache = standin_logit_cache(
            random_image_dataset(args.images, image_size=args.image_size, seed=0),
            workdir / "cache",
            args.device,
        )

        def setup_for(workers: int) -> PackingSetup:
            return PackingSetup(
                device=args.device,
                images=args.images,
                test_images=args.test_images,
                image_size=args.image_size,
                batch=args.batch,
                warmup_epochs=args.warmup_epochs,
                timed_epochs=args.timed_epochs,
                student=args.student,
                teacher=args.teacher,
                teacher_checkpoint=str(checkpoint),
                cache_path=cache.path,
                threads=max(1, (os.cpu_count() or 1) // workers),
                compile=args.compile,
            )

        rows = measure(args, setup_for)
    section = report(rows, args, load_before)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    target = markdown_target(args)
    if target is not None:
        write_section(target, SECTION, section)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
