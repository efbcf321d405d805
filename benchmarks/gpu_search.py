"""The main command on a GPU, start to finish: a packed search run, interrupted with Ctrl-C, resumed, and run again.

    python benchmarks/gpu_search.py --out DIR                  # one CUDA GPU: a few minutes
    python benchmarks/gpu_search.py --out DIR --tiny           # a CPU, tiny sizes: checks the sequence

In DIR/work (its own storage and MLflow store), with `search_spaces/gpu_check.yaml` (generated
CIFAR-format data at 32x32, resnet32x4 trained for a few epochs, the logit cache built in the
teacher's Ray task, 8 ShuffleV1 trials packed on the GPU, ASHA, MLflow):

1. `dkd-tune run search_spaces/gpu_check.yaml`, sent SIGINT (Ctrl-C, to the whole process group as
   a terminal does) once `--interrupt-after` trials have finished; it must exit 130 and say how to resume;
2. `dkd-tune resume gpu_check`: it must finish (exit 0) with every trial in results.parquet;
3. the same file with the resnet8x4 student (`--set student=resnet8x4`), uninterrupted.

DIR/gpu_search.md gets each command's exit code, wall time and stderr size, the summary each
printed, and a projection of Table A.1's sweep (3 teachers x 6 betas x 240 epochs of ShuffleV1 on
CIFAR-100's 50,000 images, 8 trials packed per GPU) from the packed ShuffleV1 trials' measured
seconds per epoch; DIR/*.log the whole outputs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "gpu_check.yaml"
# A CPU check of the sequence: the same file, shrunk (a minute or two on 2 cores).
TINY = [
    "--set", "resources.gpu=0", "--set", "resources.cpu=1", "--set", "search.num_samples=3",
    "--set", "search.max_concurrent_trials=2", "--set", "epochs=3", "--set", "lr_milestones=[2]",
    "--set", "warmup_epochs=1", "--set", "scheduler.grace_period=1", "--set", "data.generate.classes=10",
    "--set", "data.generate.superclasses=2", "--set", "data.generate.train_per_class=20",
    "--set", "data.generate.test_per_class=5", "--set", "data.generate.image_size=16",
    "--set", "data.validation=4", "--set", "teachers.0.model=resnet8",
    "--set", "teachers.0.train.overrides.epochs=1", "--set", "teachers.0.train.overrides.lr_milestones=[1]",
    "--set", "student=resnet8",
]  # fmt: skip
SWEEP_RUNS, SWEEP_EPOCHS, CIFAR_TRAIN_IMAGES, PACKED = 18, 240, 50_000, 8
FINISHED = re.compile(r"trial (\d+)/\d+ .*(finished|stopped by ASHA)")


def dkd_tune() -> str:
    return str(Path(sys.executable).with_name("dkd-tune"))


def run_logged(
    name: str, command: list[str], work: Path, out: Path, interrupt_after: int | None = None
) -> dict:
    """Run `command` in `work`, its output to out/<name>.log; with `interrupt_after`, SIGINT its process
    group once that many trials have finished. Returns the exit code, wall time and stderr's size."""
    log = out / f"{name}.log"
    errors = out / f"{name}.stderr.log"
    started = time.perf_counter()
    with log.open("w") as stdout, errors.open("w") as stderr:
        process = subprocess.Popen(command, cwd=work, stdout=stdout, stderr=stderr, start_new_session=True)
        interrupted = False
        while process.poll() is None:
            time.sleep(1.0)
            if interrupt_after is not None and not interrupted:
                finished = len(FINISHED.findall(log.read_text()))
                if finished >= interrupt_after:
                    os.killpg(process.pid, signal.SIGINT)
                    interrupted = True
        code = process.wait()
    return {
        "name": name,
        "command": " ".join(command[1:]),
        "exit": code,
        "wall_s": time.perf_counter() - started,
        "stderr_bytes": errors.stat().st_size,
        "tail": log.read_text().splitlines()[-25:],
    }


def sweep_projection(search_dir: Path) -> str:
    """Table A.1's sweep on one GPU, from the packed DKD trials' seconds per epoch in `search_dir`."""
    import pandas as pd
    import yaml

    frame = pd.read_parquet(search_dir / "results.parquet")
    trials = frame[(frame["loss"] == "dkd") & (frame["stop_epoch"] > 0)]
    if trials.empty:
        return "no DKD trial finished an epoch: no projection"
    per_epoch = (trials["wall_time_s"] / trials["stop_epoch"]).median()
    space = yaml.safe_load((search_dir / "search.yaml").read_text())
    generate = space["data"]["generate"]
    images = generate["classes"] * (generate["train_per_class"] - space["data"].get("validation", 0))
    # Seconds per epoch scale with the images (evaluation is a small share at these sizes).
    hours = per_epoch * CIFAR_TRAIN_IMAGES / images * SWEEP_EPOCHS * SWEEP_RUNS / PACKED / 3600
    return (
        f"Projection: the packed DKD trials took a median {per_epoch:.2f} s per epoch of {images:,} images "
        f"({len(trials)} trials, {PACKED} at a time); at that rate Table A.1's sweep ({SWEEP_RUNS} runs x "
        f"{SWEEP_EPOCHS} epochs x {CIFAR_TRAIN_IMAGES:,} images, {PACKED} packed) takes about **{hours:.1f} hours** "
        "on this GPU (every trial to the end; ASHA stops some early)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--interrupt-after", type=int, default=6, help="finished trials before the Ctrl-C")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    shrink = TINY if args.tiny else []
    interrupt_after = 1 if args.tiny else args.interrupt_after
    steps = [
        run_logged("run_interrupted", [dkd_tune(), "run", str(SPACE), *shrink], work, out, interrupt_after),
        run_logged("resume", [dkd_tune(), "resume", "gpu_check"], work, out),
        run_logged(
            "run_resnet8x4",
            [
                dkd_tune(),
                "run",
                str(SPACE),
                *shrink,
                "--set",
                "student=resnet8x4",
                "--name",
                "gpu_check_resnet8x4",
            ],
            work,
            out,
        ),
    ]
    lines = ["## The main command on a GPU: a packed search, Ctrl-C, resume", ""]
    lines += ["| step | command | exit | wall (s) | stderr bytes |", "|---|---|---|---|---|"]
    for step in steps:
        lines.append(
            f"| {step['name']} | `dkd-tune {step['command']}` | {step['exit']} | {step['wall_s']:.0f} | {step['stderr_bytes']} |"
        )
    for step in steps:
        lines += ["", f"{step['name']}, last lines:", "", "```", *step["tail"], "```"]
    if steps[1]["exit"] == 0:
        lines += ["", sweep_projection(work / "dkd_runs" / "gpu_check")]
    text = "\n".join(lines)
    (out / "gpu_search.md").write_text(text + "\n")
    print(text)
    expected = [130, 0, 0]
    if [step["exit"] for step in steps] != expected:
        sys.exit(f"exit codes {[step['exit'] for step in steps]}, expected {expected}")


if __name__ == "__main__":
    main()
