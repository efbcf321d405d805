"""Every GPU figure of docs/benchmarks.md in one command of under 8 minutes (torch + dkd_tune core only).

    python benchmarks/gpu.py --out DIR                     # on a machine with a CUDA GPU
    python benchmarks/gpu.py --out DIR --device cpu --tiny # seconds: checks the whole sequence on a CPU

Runs, each as its own process with its own time limit, most important first (`--steps` chooses;
the default, search and profile, takes at most 10 minutes: what a 15-minute device loan allows):
0. benchmarks/gpu_search.py: the main command on the GPU (a packed search, Ctrl-C, resume, another
   student) and the projection of Table A.1's sweep from its packed trials;
0. benchmarks/gpu_profile.py: a profile of the training step and a sweep of the speed settings per
   student (CUDA graphs, channels_last, bf16, grouped 1x1 convolutions run dense);
1. benchmarks/peak_memory.py --device cuda --images 50000 --epochs 2: a CIFAR-100-sized trial of
   resnet32x4 -> resnet8x4 with the live teacher and with the logit cache (the epoch time, the
   "one epoch in under 10 s" target, and host and device peak memory);
2. benchmarks/gpu_packing.py: aggregate throughput of 1, 2, 4 and 8 concurrent trials;
3. benchmarks/training_step.py --device cuda: images/s of the reference loop, dkd-tune's loop
   (live teacher, cache) and the floor, for the three pairs (written after each pair).
The sections go into DIR/benchmarks.md (a copy of docs/benchmarks.md: copy it back, or paste the
sections), the raw results into DIR/*.json, each script's output into DIR/*.log, and the GPU's
description into DIR/environment.txt. torch.compile's cache is shared between the steps (the
first compiles resnet8x4, the later ones reuse it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, script arguments, seconds allowed); the limits add up to 460 s, under 8 minutes with start-up.
# On an H200 the three took 145, 131 and (with 5 rounds) 174 s: 3 rounds keep the last inside its limit.
STEPS = (
    ("search", ["gpu_search.py"], 300),
    ("profile", ["gpu_profile.py"], 300),
    ("cifar_epoch_memory", ["peak_memory.py", "--images", "50000", "--epochs", "2"], 150),
    ("packing", ["gpu_packing.py"], 140),
    ("training_step", ["training_step.py", "--rounds", "3"], 170),
)
DEFAULT_STEPS = ("search", "profile")
# These two write their own DIR/<name>.md instead of sections of a benchmarks.md copy.
OWN_FOLDER = {"gpu_search.py", "gpu_profile.py"}
TINY_ARGUMENTS = {
    "gpu_search.py": ["--tiny"],
    "gpu_profile.py": ["--tiny"],
    "peak_memory.py": ["--tiny"],
    "gpu_packing.py": ["--tiny"],
    "training_step.py": ["--tiny"],
}


def describe_environment(out: Path, device: str) -> None:
    lines = [f"python {sys.version.split()[0]}", f"date {time.strftime('%Y-%m-%d %H:%M')}"]
    if device.startswith("cuda") and shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"],
            capture_output=True,
            text=True,
            check=False,
        )
        lines.append(query.stdout.strip())
    completed = subprocess.run(
        [sys.executable, "-c", "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines.append(completed.stdout.strip())
    (out / "environment.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for benchmarks.md, *.json, *.log")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="run every step in its seconds-long mode")
    parser.add_argument(
        "--steps", nargs="+", choices=[name for name, _, _ in STEPS], default=list(DEFAULT_STEPS),
        help="which measurements, in this order",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = args.out / "benchmarks.md"
    shutil.copyfile(ROOT / "docs" / "benchmarks.md", markdown)
    describe_environment(args.out, args.device)
    environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    summary = []
    chosen = {name: (arguments, limit) for name, arguments, limit in STEPS}
    for name in args.steps:
        (script, *options), limit = chosen[name]
        if args.tiny:
            options = TINY_ARGUMENTS[script]
        command = [sys.executable, str(ROOT / "benchmarks" / script), *options]
        if script == "gpu_search.py":  # the search takes its device from the file (gpu: 0.125)
            command += ["--out", str(args.out)]
        elif script in OWN_FOLDER:
            command += ["--device", args.device, "--out", str(args.out)]
        else:
            command += [
                "--device",
                args.device,
                "--out",
                str(markdown),
                "--json",
                str(args.out / f"{name}.json"),
            ]
        print(f"== {name}: {' '.join(command[1:])} (up to {limit} s)", flush=True)
        start = time.perf_counter()
        with (args.out / f"{name}.log").open("w") as log:
            try:
                completed = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=environment, timeout=limit, check=False
                )
                outcome = f"exit {completed.returncode}"
            except subprocess.TimeoutExpired:
                outcome = f"stopped at its {limit} s limit (sections written so far are kept)"
        summary.append(f"{name}: {outcome} after {time.perf_counter() - start:.0f} s")
        print(f"   {summary[-1]}", flush=True)
    (args.out / "summary.txt").write_text("\n".join(summary) + "\n")
    print(f"sections in {markdown}")


if __name__ == "__main__":
    main()
