"""Where a GPU training step's time goes, and which speed setting wins per student: a profile and a settings sweep.

    python benchmarks/gpu_profile.py --out DIR                      # a CUDA GPU, about 2 minutes
    python benchmarks/gpu_profile.py --out DIR --device cpu --tiny  # seconds: checks that the script runs

For each student (resnet8x4 and ShuffleV1, the main command's), the DKD training step of dkd-tune's
loop on a fixed batch of 64 CIFAR-shaped images with cached teacher logits (what a trial with the
logit cache does once its batch is on the device): the student's forward, `training_objective`,
backward and the SGD step. Settings, each from `Acceleration` (what `fit` would run with them):

- fp32 eager (the reference code bases' arithmetic, nothing compiled);
- today's CUDA default: bf16 autocast, channels_last, torch.compile (default mode), TF32, cuDNN benchmark;
- today without channels_last; today without bf16;
- CUDA graphs (`compile_mode="reduce-overhead"`) without channels_last;
- where the student has grouped 1x1 convolutions, those run dense (`dense_grouped_pointwise`) with
  CUDA graphs and without channels_last.

Each setting runs `--warmup` steps (compilation, cuDNN's search, graph capture), then `--rounds`
timed rounds of `--steps` steps, rotated so no setting always runs first; the table gives the
median images/s and the ratio to fp32 eager in the same run. Then torch.profiler records 10 steps
of today's default and of the fastest setting: kernels launched per step, device-busy time per step
against wall time per step, and the 5 kernels that take most device time. The section goes to
DIR/gpu_profile.md and the raw numbers to DIR/gpu_profile.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.timing import interleaved_rounds, machine_description, median, synchronize, today  # noqa: E402
from dkd_tune.core.recipes import resolve_recipe  # noqa: E402
from dkd_tune.engine.acceleration import Acceleration, compiled, memory_format, prepared_model  # noqa: E402
from dkd_tune.engine.loop import training_objective  # noqa: E402
from dkd_tune.models import create_model  # noqa: E402
from dkd_tune.models.grouped_pointwise import is_grouped_pointwise  # noqa: E402

STUDENTS = ("resnet8x4", "ShuffleV1")
BATCH, CLASSES, SIZE = 64, 100, 32
SECTION = "## Where a GPU training step's time goes: a profile and a settings sweep"


def settings_for(student: str, device: torch.device) -> dict[str, Acceleration]:
    """The settings compared for `student` on `device`, by name."""
    today_default = Acceleration.for_device(device)
    variants = {
        "fp32 eager": Acceleration(),
        "today (bf16, channels_last, compile)": today_default,
        "today without channels_last": dataclasses.replace(today_default, channels_last=False),
        "today without bf16": dataclasses.replace(today_default, autocast_dtype=None),
        "CUDA graphs, no channels_last": dataclasses.replace(
            today_default, compile_mode="reduce-overhead", channels_last=False
        ),
    }
    # Every compiled setting costs its compilation (tens of seconds): the grid is kept to these.
    if any(is_grouped_pointwise(m) for m in create_model(student, num_classes=CLASSES).modules()):
        variants["dense grouped 1x1, CUDA graphs, no channels_last"] = dataclasses.replace(
            today_default, dense_grouped_pointwise=True, compile_mode="reduce-overhead", channels_last=False
        )
    return variants


class Step:
    """dkd-tune's training step for one student and one setting, on a fixed batch already on the device."""

    def __init__(self, student_name: str, acceleration: Acceleration, device: torch.device):
        torch.manual_seed(0)
        self.acceleration, self.device = acceleration, device
        acceleration.apply_global_settings()
        student = prepared_model(create_model(student_name, num_classes=CLASSES), acceleration)
        self.student = student.to(device, memory_format=memory_format(acceleration)).train()
        self.model = compiled(self.student, acceleration)
        self.recipe = resolve_recipe("cifar100")
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
        self.images = images.to(device, dtype=acceleration.input_dtype).contiguous(
            memory_format=memory_format(acceleration)
        )
        self.labels = torch.randint(0, CLASSES, (BATCH,), generator=generator).to(device)
        self.teacher_logits = torch.randn(BATCH, CLASSES, generator=generator).to(device)

    def __call__(self) -> None:
        if self.acceleration.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.acceleration.autocast(self.device):
            logits = self.model(self.images)
            loss, _ = training_objective("dkd", logits, self.teacher_logits, self.labels, self.recipe, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def images_per_s(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self()
        synchronize(self.device)
        return steps * BATCH / (time.perf_counter() - start)


def profile(step: Step, steps: int = 10) -> dict:
    """Kernels per step, device-busy and wall time per step, the top kernels by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    synchronize(step.device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as recorded:
        for _ in range(steps):
            step()
        synchronize(step.device)
    wall = (time.perf_counter() - start) / steps
    events = recorded.key_averages()
    if step.device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
        launches = sum(e.count for e in kernels) / steps
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:5]
        top_rows = [(e.key[:70], e.self_device_time_total / 1e3 / steps) for e in top]
    else:  # a CPU has no kernels: operators stand in, so the script's path is checked
        ops = [e for e in events if e.key.startswith("aten::")]
        busy = sum(e.self_cpu_time_total for e in ops) / 1e6 / steps
        launches = sum(e.count for e in ops) / steps
        top_rows = [
            (e.key[:70], e.self_cpu_time_total / 1e3 / steps)
            for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:5]
        ]
    return {"wall_ms": 1e3 * wall, "busy_ms": 1e3 * busy, "launches": launches, "top": top_rows}


def sweep(student: str, device: torch.device, args) -> dict:
    """Every setting's median images/s (rotated rounds), and a profile of today's and the fastest."""
    steps = {
        name: Step(student, acceleration, device)
        for name, acceleration in settings_for(student, device).items()
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    names = list(steps)
    samples, _ = interleaved_rounds(
        {name: (lambda step=step: step.images_per_s(args.steps)) for name, step in steps.items()}, args.rounds
    )
    speeds = {name: median(values) for name, values in samples.items()}
    fastest = max(speeds, key=speeds.get)
    today_name = next(name for name in names if name.startswith("today"))
    profiles = {name: profile(steps[name]) for name in dict.fromkeys([today_name, fastest])}
    return {"speeds": speeds, "samples": samples, "fastest": fastest, "profiles": profiles}


def section(results: dict, args, device: torch.device) -> str:
    lines = [
        SECTION,
        "",
        f"- Machine: {machine_description(device)}. Date: {today()}.",
        f"- Command: `python benchmarks/gpu_profile.py --out DIR{' --device ' + args.device if args.device != 'cuda' else ''}"
        f"{' --tiny' if args.tiny else ''}`: dkd-tune's DKD training step (cached teacher logits) on a fixed "
        f"batch of {BATCH} images, {args.warmup} warm-up steps, then {args.rounds} rotated rounds of {args.steps} steps.",
        "",
    ]
    for student, result in results.items():
        eager = result["speeds"]["fp32 eager"]
        lines += [f"**{student}** (images/s, median of rounds; ratio to fp32 eager in this run):", "",
                  "| setting | images/s | x fp32 eager |", "|---|---|---|"]  # fmt: skip
        for name, speed in result["speeds"].items():
            mark = " (fastest)" if name == result["fastest"] else ""
            lines.append(f"| {name}{mark} | {speed:,.0f} | {speed / eager:.2f} |")
        lines += ["", "| profiled setting | wall ms/step | device-busy ms/step | kernels/step | top kernels (ms/step) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, row in result["profiles"].items():
            top = "; ".join(f"{key} {ms:.2f}" for key, ms in row["top"][:3])
            lines.append(
                f"| {name} | {row['wall_ms']:.2f} | {row['busy_ms']:.2f} | {row['launches']:.0f} | {top} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps on resnet8x4 only: checks the script"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    if args.tiny:
        args.warmup, args.rounds, args.steps = 1, 2, 2
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    students = STUDENTS[:1] if args.tiny else STUDENTS
    results = {}
    for student in students:
        results[student] = sweep(student, device, args)
        print(
            f"{student}: " + ", ".join(f"{n} {s:,.0f}" for n, s in results[student]["speeds"].items()),
            flush=True,
        )
    (args.out / "gpu_profile.json").write_text(json.dumps(results, indent=1, default=str))
    text = section(results, args, device)
    (args.out / "gpu_profile.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
