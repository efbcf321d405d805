"""Peak memory of one trial (host RSS, and device memory on CUDA), with the live teacher and with the logit cache.

    python benchmarks/peak_memory.py                            # CPU; updates docs/benchmarks.md
    python benchmarks/peak_memory.py --device cuda --images 50000 --epochs 1   # a CIFAR-100-sized trial
    python benchmarks/peak_memory.py --tiny                     # seconds: checks that the script runs

Each trial runs `trial.run_trial` (loaders, student, teacher source, `engine.loop.fit` with per-epoch
checkpoints) in a fresh process: resnet32x4 (a random-weight checkpoint) -> resnet8x4, DKD,
batch 64, `--images` random 32x32 training images (100 classes) and 1,000 test images. In that
process a thread reads /proc/self/status every 20 ms; the table gives

- peak RSS (VmHWM: the most resident memory the process ever had), and the peaks of its two
  parts: anonymous memory (the process's own: Python, torch, data, models, activations) and
  file-backed pages (memory-mapped files the process touched, the logit cache among them; these
  live in the shared page cache, so trials on one machine reading one cache share them);
- the same process's RSS just before `run_trial` (Python + torch + the dataset), so the trial's
  own part is the difference;
- on CUDA, `torch.cuda.max_memory_allocated` and `max_memory_reserved`.

The cache is built beforehand for the same images by a stand-in teacher (benchmarks/workloads.py);
its size is images x 162 views x 100 classes x 2 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
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

SECTION = "## Peak memory of a trial: live teacher vs logit cache"
TEST_IMAGES = 1000
MIB = 2**20


def memory_status() -> dict[str, int]:
    """Bytes of VmRSS, VmHWM, RssAnon, RssFile and RssShmem of this process, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0]) * 1024
    return values


class PeakSampler:
    """Samples this process's memory every `interval` seconds on a thread and keeps the peaks."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        for key, value in memory_status().items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------------------------
# One trial (in a fresh process: `--child CONFIG`)


def child_trial(config: dict) -> dict:
    import torch

    from benchmarks.workloads import random_image_dataset
    from dkd_tune.core.recipes import resolve_recipe
    from dkd_tune.data.shared import SharedDataset
    from dkd_tune.teacher.preparation import TeacherArtifacts
    from dkd_tune.trial import TrialPlan, run_trial

    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    train_set = random_image_dataset(config["images"], image_size=config["image_size"], seed=0)
    test_set = random_image_dataset(config["test_images"], image_size=config["image_size"], seed=1)
    data = SharedDataset.from_datasets(train_set, test_set)
    del train_set, test_set
    recipe = dataclasses.replace(
        resolve_recipe("cifar100", student=config["student"], teacher=config["teacher"]),
        epochs=config["epochs"],
        batch_size=config["batch"],
        warmup_epochs=config["epochs"],
    )
    plan = TrialPlan(
        student=config["student"],
        num_classes=100,
        dataset_name="random",
        augment="standard",
        loss_mode="dkd",
        base_recipe=recipe,
        teacher=TeacherArtifacts(
            label="teacher",
            model=config["teacher"],
            checkpoint=config["teacher_checkpoint"],
            num_classes=100,
            gap=None,
            cache_path=config["cache_path"],
        ),
        max_epochs=config["epochs"],
        compile=config["compile"],
        cpus_per_trial=config["threads"],
    )
    before = memory_status()
    epoch_ends = []
    with tempfile.TemporaryDirectory(prefix="dkd-memory-trial-") as workdir, PeakSampler() as sampler:
        start = time.perf_counter()
        result = run_trial(
            plan,
            data,
            {},
            reporter=lambda _report: epoch_ends.append(time.perf_counter()),
            checkpoint_dir=Path(workdir),
            device=device,
        )
        seconds = time.perf_counter() - start
    outcome = {
        "before": before,
        "peaks": sampler.peaks,
        "hwm": memory_status()["VmHWM"],
        "seconds": seconds,
        "epochs": result.epochs_completed,
        # Training batches only (fit's own clock), and the whole epoch with evaluation and checkpoint.
        "epoch_train_s": [epoch["epoch_time_s"] for epoch in result.history],
        "epoch_wall_s": [end - begin for begin, end in zip([start, *epoch_ends], epoch_ends, strict=False)],
    }
    if device.type == "cuda":
        outcome["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        outcome["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
    return outcome


def run_child(config: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"trial process failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Parent: teacher checkpoint, cache, one trial per mode


def measure(args) -> tuple[dict[str, dict], dict]:

    from benchmarks.workloads import random_image_dataset, random_teacher_checkpoint, standin_logit_cache

    results = {}
    with tempfile.TemporaryDirectory(prefix="dkd-memory-bench-") as workdir:
        workdir = Path(workdir)
        checkpoint = random_teacher_checkpoint(workdir / "teacher.pt", args.teacher, 100, args.image_size)
        started = time.perf_counter()
        dataset = random_image_dataset(args.images, image_size=args.image_size, seed=0)
        cache = standin_logit_cache(dataset, workdir / "cache", args.device)
        build_seconds = time.perf_counter() - started
        del dataset
        common = {
            "device": args.device,
            "threads": args.threads,
            "images": args.images,
            "test_images": args.test_images,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "batch": args.batch,
            "student": args.student,
            "teacher": args.teacher,
            "teacher_checkpoint": str(checkpoint),
            "compile": args.compile,
        }
        for mode, cache_path in (("live", None), ("cache", cache.path)):
            print(f"trial with the {mode} teacher ...", flush=True)
            results[mode] = run_child({**common, "cache_path": cache_path})
        cache_info = {"nbytes": cache.nbytes, "build_seconds": build_seconds}
    return results, cache_info


def report(results: dict[str, dict], cache_info: dict, args, load_before: float, load_after: float) -> str:
    on_gpu = args.device.startswith("cuda")
    lines = [
        SECTION + (" (GPU)" if on_gpu else ""),
        "",
        f"- Machine: {machine_description(args.device)}; torch threads: {args.threads}; 1-minute load average"
        f" {load_before:.2f} before, {load_after:.2f} after.",
        f"- Date: {today()}.",
        f"- Command: `{command_line(args)}`.",
        f"- Trial: {args.teacher} -> {args.student}, DKD, batch {args.batch}, {args.images:,} training and"
        f" {args.test_images:,} test images ({args.image_size}x{args.image_size}, 100 classes), {args.epochs}"
        f" epoch(s), per-epoch checkpoints; the cache holds {cache_info['nbytes'] / MIB:.1f} MiB"
        f" ({args.images:,} x 162 views x 100 classes, float16).",
        "",
        "| teacher logits | peak RSS (MiB) | anonymous: before -> peak (MiB) | file-backed: before -> peak (MiB) |"
        + " the trial's own: anonymous + file-backed (MiB) |"
        + (" peak CUDA allocated / reserved (MiB) |" if on_gpu else "")
        + " last epoch: training / whole (s) | trial time (s) |",
        "|---|---|---|---|---|" + ("---|" if on_gpu else "") + "---|---|",
    ]
    for mode, label in (("live", "live teacher"), ("cache", "logit cache")):
        row = results[mode]
        before, peaks = row["before"], row["peaks"]
        anon_own = (peaks["RssAnon"] - before["RssAnon"]) / MIB
        file_own = (peaks["RssFile"] - before["RssFile"]) / MIB
        cells = [
            f"{row['hwm'] / MIB:.0f}",
            f"{before['RssAnon'] / MIB:.0f} -> {peaks['RssAnon'] / MIB:.0f}",
            f"{before['RssFile'] / MIB:.0f} -> {peaks['RssFile'] / MIB:.0f}",
            f"{anon_own:.0f} + {file_own:.0f}",
        ]
        if on_gpu:
            cells.append(f"{row['cuda_max_allocated'] / MIB:.0f} / {row['cuda_max_reserved'] / MIB:.0f}")
        cells.append(f"{row['epoch_train_s'][-1]:.2f} / {row['epoch_wall_s'][-1]:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['seconds']:.1f} |")
    lines += [
        "",
        "Training covers the epoch's batches (`fit`'s own `epoch_time_s`); whole adds the evaluation on the"
        " test images and the checkpoint. The first epoch also pays one-time costs"
        + (" (torch.compile)" if on_gpu else "")
        + ", so the last epoch is shown.",
    ]
    return "\n".join(lines) + "\n"


def command_line(args) -> str:
    parts = ["python benchmarks/peak_memory.py"]
    if args.tiny:
        return parts[0] + " --tiny"
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    for name, default in (("images", 2560), ("epochs", 2), ("threads", 1)):
        if getattr(args, name) != default:
            parts.append(f"--{name} {getattr(args, name)}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2560, help="training images (CIFAR-100: 50,000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: on for CUDA)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child_trial(json.loads(args.child))))
        return
    args.batch, args.image_size, args.test_images = 64, 32, TEST_IMAGES
    args.student, args.teacher = "resnet8x4", "resnet32x4"
    if args.tiny:
        args.images, args.epochs, args.batch, args.image_size, args.test_images = 64, 1, 16, 8, 32
        args.student, args.teacher = "resnet8", "resnet8"
    load_before = load_average()
    results, cache_info = measure(args)
    section = report(results, cache_info, args, load_before, load_average())
    print(section)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cache": cache_info}, indent=2))
    target = markdown_target(args)
    if target is not None:
        write_section(target, SECTION + (" (GPU)" if args.device.startswith("cuda") else ""), section)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
