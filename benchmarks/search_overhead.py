"""Overhead of the search machinery: a one-trial `dkd-tune run` vs the same `engine.loop.fit` called directly (CPU).

    python benchmarks/search_overhead.py                 # 3 interleaved rounds; updates docs/benchmarks.md
    python benchmarks/search_overhead.py --tiny          # seconds-long trial: checks that the script runs

The trial: resnet32x4 (a checkpoint of random weights, so no teacher training is timed) ->
resnet8x4 with DKD and the live teacher, on a generated 32x32 dataset (20 classes, 320 training
and 200 test images), 7 epochs of 5 batches of 64, one CPU thread: about a minute on the 2-core
machine, with epochs of about 9 s, about as long as a CIFAR-100 epoch on a GPU. The search file
has one trial, no ASHA, no baseline and the logit cache off.

Each round runs, in a rotated order:
- direct: a fresh Python process loads the same data, plan and models and calls
  `trial.run_trial` (which builds the loaders and calls `engine.loop.fit`) twice: without a checkpoint
  folder (the bare `fit`) and with one (plus the per-epoch checkpoint writes); each call is timed
  from its start to its return.
- search: `python -m dkd_tune run` on the file, timed as a whole. From the part's Ray Tune
  experiment state: the trial's wall time, from the moment Ray marked it RUNNING (its actor is
  up) to the moment the driver received its last result; from its result.json, Ray's
  `time_total_s` (the training function's start to its last report). Both include handing the
  trial its data through the object store, building loaders and models, every epoch's report
  and checkpoint (written, then persisted by Ray).
Overhead = (trial wall time - bare fit) / trial wall time, from the medians. Before a trial is
RUNNING, a fresh worker process imports the trainable (ray, torch, dkd_tune); that cost is timed
once in a fresh process and shown beside it (with `reuse_actors` a search pays it once per
worker process, not per trial).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.timing import (  # noqa: E402
    add_output_arguments,
    interleaved_rounds,
    load_average,
    machine_description,
    markdown_target,
    median,
    spread,
    today,
    write_section,
)

SECTION = "## Search overhead: a trial inside `dkd-tune run` vs `engine.loop.fit` called directly"
TEACHER_LABEL = "teacher"


def search_file(workdir: Path, tiny: bool) -> Path:
    """The one-trial search file and the teacher checkpoint it names (random weights)."""
    from benchmarks.workloads import random_teacher_checkpoint

    teacher_model, student = ("resnet8", "resnet8") if tiny else ("resnet32x4", "resnet8x4")
    generate = (
        {"classes": 5, "superclasses": 5, "train_per_class": 16, "test_per_class": 8, "image_size": 8}
        if tiny
        else {"classes": 20, "superclasses": 5, "train_per_class": 16, "test_per_class": 10, "image_size": 32}
    )
    epochs = 3 if tiny else 7
    checkpoint = random_teacher_checkpoint(
        workdir / "teacher.pt", teacher_model, generate["classes"], generate["image_size"], "synthetic"
    )
    space = {
        "name": "overhead",
        "data": {"name": "synthetic", "root": str(workdir / "data"), "generate": generate},
        "student": student,
        "recipe": "cifar100",
        "overrides": {
            "epochs": epochs,
            "lr_milestones": [epochs - 2],
            "warmup_epochs": 2,
            "batch_size": 16 if tiny else 64,
        },
        "teachers": [{"name": TEACHER_LABEL, "model": teacher_model, "checkpoint": str(checkpoint)}],
        "space": {"beta": 8.0, "temperature": 4.0},
        "search": {"algorithm": "random", "seed": 0, "num_samples": 1},
        "scheduler": {"type": "none"},
        "resources": {"cpu": 1},
        "cache": {"teacher_logits": "off"},
        "max_failures": 0,
    }
    path = workdir / "overhead.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def environment() -> dict[str, str]:
    # Ray's workers import dkd_tune and trainables from this checkout.
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --------------------------------------------------------------------------------------------
# The direct call (runs in a fresh process: `--direct FILE`)


def run_direct(space_path: Path) -> dict[str, float]:
    """Time `run_trial` (loaders + `engine.loop.fit`) on the search's own plan and data, without and with checkpoints."""
    import torch

    from dkd_tune.config.loading import load_search_space
    from dkd_tune.config.plan import trial_plan
    from dkd_tune.data import load_train_test
    from dkd_tune.data.shared import SharedDataset
    from dkd_tune.teacher.preparation import TeacherArtifacts
    from dkd_tune.trial import run_trial

    space = load_search_space(space_path)
    teacher = space.teachers[0]
    data_spec = space.data_spec
    train_set, test_set = load_train_test(data_spec)
    data = SharedDataset.from_datasets(train_set, test_set)
    artifacts = TeacherArtifacts(
        label=teacher.label,
        model=teacher.model,
        checkpoint=str(Path(teacher.checkpoint).resolve()),
        num_classes=train_set.num_classes,
        gap=None,
        cache_path=None,
    )
    plan = trial_plan(space, teacher, artifacts, teacher.label)
    times = {}
    with tempfile.TemporaryDirectory(prefix="dkd-overhead-direct-") as workdir:
        for name, checkpoint_dir in (("fit", None), ("fit_checkpoints", Path(workdir))):
            start = time.perf_counter()
            result = run_trial(
                plan, data, {}, reporter=None, checkpoint_dir=checkpoint_dir, device=torch.device("cpu")
            )
            times[name] = time.perf_counter() - start
            times[f"{name}_epochs"] = result.epochs_completed
    return times


def direct_round(space_path: Path) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, __file__, "--direct", str(space_path)],
        env=environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"direct trial failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The search


def search_round(space_path: Path, workdir: Path, index: int) -> dict[str, float]:
    """Run `dkd-tune run` on the file in a fresh folder; the command's and the trial's times."""
    folder = workdir / f"search-{index}"
    folder.mkdir()
    start = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkd_tune",
            "run",
            str(space_path),
            "--storage",
            str(folder / "runs"),
            "--tracking-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
        ],
        cwd=folder,
        env=environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    command_seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"dkd-tune run failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}")
    (state_file,) = (folder / "runs").glob(f"*/{TEACHER_LABEL}/experiment_state-*.json")
    (trial_entry,) = json.loads(state_file.read_text())["trial_data"]
    run = json.loads(trial_entry[1])  # Ray's run metadata: when the trial started RUNNING, its last result
    (result_file,) = (folder / "runs").glob(f"*/{TEACHER_LABEL}/*/result.json")
    results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    return {
        "command": command_seconds,
        "ray_time_total": results[-1]["time_total_s"],
        "trial_wall": run["last_result_time"] - run["start_time"],
        "epochs": results[-1]["epoch"],
    }


def import_seconds() -> float:
    """What a fresh Ray worker pays before a trial can start: importing the trainable (ray, torch, dkd_tune)."""
    code = "import time; start = time.perf_counter(); import trainables.distill; print(time.perf_counter() - start)"
    completed = subprocess.run(
        [sys.executable, "-c", code], env=environment(), capture_output=True, text=True, check=True
    )
    return float(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Report


def report(direct: list[dict], search: list[dict], imports: float, loads, load_before: float, args) -> str:
    fit = median(row["fit"] for row in direct)
    fit_checkpoints = median(row["fit_checkpoints"] for row in direct)
    trial = median(row["trial_wall"] for row in search)
    ray_total = median(row["ray_time_total"] for row in search)
    command = median(row["command"] for row in search)
    overhead = (trial - fit) / trial
    with_imports = (trial + imports - fit) / (trial + imports)

    def seconds(rows: list[dict], key: str) -> str:
        return f"{median(row[key] for row in rows):.1f} ({spread([row[key] for row in rows])})"

    lines = [
        SECTION,
        "",
        f"- Machine: {machine_description()}; 1 torch thread in the trial (resources.cpu: 1) and in the"
        f" direct call; 1-minute load average {load_before:.2f} before, {min(loads):.2f}-{max(loads):.2f}"
        " after each round.",
        f"- Date: {today()}.",
        "- Command: `python benchmarks/search_overhead.py"
        + (" --tiny" if args.tiny else f" --rounds {args.rounds}" if args.rounds != 3 else "")
        + f"` ({args.rounds} interleaved round(s); medians, min-max in brackets).",
        "- Trial: resnet32x4 (random-weight checkpoint) -> resnet8x4, DKD, live teacher, 20 classes of"
        " 32x32 generated images (320 train, 200 test), 7 epochs of 5 batches of 64, evaluation and a"
        " checkpoint every epoch. One trial, no ASHA, no baseline, cache off.",
        "",
        "| what | seconds | vs bare `fit` |",
        "|---|---|---|",
        f"| `engine.loop.fit` called directly (`run_trial`), no checkpoints | {seconds(direct, 'fit')} | 1.000 |",
        f"| `engine.loop.fit` called directly, per-epoch checkpoints | {seconds(direct, 'fit_checkpoints')}"
        f" | {fit_checkpoints / fit:.3f} |",
        f"| the trial in `dkd-tune run`: Ray's `time_total_s` | {seconds(search, 'ray_time_total')}"
        f" | {ray_total / fit:.3f} |",
        f"| the trial in `dkd-tune run`: RUNNING -> last result received | {seconds(search, 'trial_wall')}"
        f" | {trial / fit:.3f} |",
        f"| importing the trainable in a fresh process (once per worker) | {imports:.1f} | |",
        f"| whole `dkd-tune run` command | {seconds(search, 'command')} | {command / fit:.3f} |",
        "",
        f"Search overhead: (trial wall time - bare fit) / trial wall time = **{100 * overhead:.1f}%**"
        f" (target: under 5%: {'met' if overhead < 0.05 else 'missed'}); counting a fresh worker's"
        f" imports as well: {100 * with_imports:.1f}%.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--direct", type=Path, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.direct is not None:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(run_direct(args.direct)))
        return
    if args.tiny:
        args.rounds = 1
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="dkd-overhead-bench-") as workdir:
        workdir = Path(workdir)
        space_path = search_file(workdir, args.tiny)
        direct, search, counter = [], [], iter(range(1000))
        contenders = {
            "direct": lambda: direct.append(direct_round(space_path)) or direct[-1]["fit"],
            "search": lambda: (
                search.append(search_round(space_path, workdir, next(counter))) or search[-1]["trial_wall"]
            ),
        }
        _, loads = interleaved_rounds(contenders, args.rounds, progress=lambda line: print(line, flush=True))
        imports = import_seconds()
    section = report(direct, search, imports, loads, load_before, args)
    print(section)
    if args.json:
        args.json.write_text(
            json.dumps({"direct": direct, "search": search, "imports": imports, "loads": loads}, indent=2)
        )
    target = markdown_target(args)
    if target is not None:
        write_section(target, SECTION, section)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
