"""Where should ASHA's first rung be? Rank correlation of early accuracy with final accuracy, demo setting.

ASHA keeps the trials whose accuracy at a rung (an epoch count) ranks high. That is worth something
only if the ranking at the rung predicts the ranking at the end. This trains the demo's student
(resnet8, the demo recipe: 8 epochs, warm-up 2, lr step at 6) with DKD from the demo's teacher
(resnet20, trained once with the demo's teacher recipe) for every beta of a log2 grid and both
temperatures of the demo's space, on several seeds, records the test top-1 after every epoch, and
reports per seed the Spearman rank correlation between the accuracy at epoch k and the final one.

    python benchmarks/rung_correlation.py --out /tmp/rungs          # about 12 minutes on 2 cores
    python benchmarks/rung_correlation.py --tiny --out /tmp/rungs   # a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_tune.config import load_search_space
from dkd_tune.data import InMemoryData, load_train_test, parse_data_spec
from dkd_tune.models import load_teacher
from dkd_tune.recipes import resolve_recipe
from dkd_tune.search_plan import search_parts, trial_plan
from dkd_tune.teacher import train_teacher_once
from dkd_tune.train import fit, prepare_run
from dkd_tune.trial import trial_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
BETAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TEMPERATURES = (2.0, 4.0)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho with average ranks for ties."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (data, teacher, results.json)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="2 betas, 1 temperature, 1 seed, 2 epochs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    space = load_search_space(DEMO)
    spec = parse_data_spec({**space.data_spec_value(), "root": str(args.out / "data")}, source="data")
    train_set, test_set = load_train_test(spec)  # generated there, as the demo generates it
    part_name, teacher_entry = next((name, t) for name, t in search_parts(space) if t is not None)
    teacher_recipe = resolve_recipe(
        teacher_entry.train.recipe, student=teacher_entry.model, overrides=teacher_entry.train.overrides
    )
    betas, temperatures, seeds = BETAS, TEMPERATURES, range(args.seeds)
    if args.tiny:
        teacher_recipe = resolve_recipe(teacher_entry.train.recipe, student=teacher_entry.model, overrides={
            **teacher_entry.train.overrides, "epochs": 1, "lr_milestones": []})  # fmt: skip
        betas, temperatures, seeds = (1.0, 8.0), (4.0,), range(1)
    device = torch.device("cpu")
    weights = train_teacher_once(
        teacher_entry.model, teacher_recipe, train_set, test_set, "standard", args.out / "teacher", device
    )
    teacher = load_teacher(teacher_entry.model, weights, num_classes=train_set.num_classes, device=device)
    base = trial_plan(space, teacher_entry, None, part_name).base_recipe
    if args.tiny:
        base = dataclasses.replace(base, epochs=2, lr_milestones=(1,), warmup_epochs=1)
    data = InMemoryData(train_set, test_set, augment="standard")

    curves = []
    started = time.perf_counter()
    for seed in seeds:
        for temperature in temperatures:
            for beta in betas:
                recipe = trial_recipe(base, {"beta": beta, "temperature": temperature, "seed": seed})
                run = prepare_run(space.student, data, recipe, device=device, compile=False)
                reports = []
                fit(
                    run.model, run.train_loader, run.test_loader, recipe, identity=run.identity,
                    loss_mode="dkd", teacher=teacher, device=device, reporter=reports.append,
                )  # fmt: skip
                accuracy = [report.metrics["test_acc"] for report in reports]
                curves.append({"seed": seed, "beta": beta, "temperature": temperature, "test_acc": accuracy})
                print(
                    f"seed {seed} T {temperature:g} beta {beta:g}: " + " ".join(f"{a:.1f}" for a in accuracy)
                )
    seconds = time.perf_counter() - started

    epochs = base.epochs
    table = []
    for seed in seeds:
        runs = [c for c in curves if c["seed"] == seed]
        final = [c["test_acc"][-1] for c in runs]
        table.append([spearman([c["test_acc"][k] for c in runs], final) for k in range(epochs - 1)])
    print(f"\n{len(curves)} runs of {epochs} epochs in {seconds:.0f} s; warm-up {base.warmup_epochs} epochs")
    print("| rung (epoch) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|" + "---|" * (len(table) + 1))
    for k in range(epochs - 1):
        values = [row[k] for row in table]
        print(
            f"| {k + 1} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {statistics.fmean(values):.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"curves": curves, "spearman": table}, indent=1))


if __name__ == "__main__":
    main()
