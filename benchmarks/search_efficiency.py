"""How much compute does a search need to find a beta as good as the best one? Searches replayed on a validation grid.

The oracle is `dkd-tune validate-beta`'s grid (every beta x seed trained to the end, per-epoch
validation and test top-1 in `curves.parquet`). A replayed search runs the real Ray Tune + Optuna +
ASHA machinery on trials that read the grid run of the nearest grid beta (`dkd_tune.search.replay`),
so hundreds of searches take minutes. For each teacher of the grid and each search seed, it counts
the trial-epochs spent until the search's incumbent (its best full-budget trial on the validation
split) has a test top-1 within 0.5 points of the oracle's (the grid beta with the best mean
validation top-1, read on the same seed's run), for:

  a. Ray's OptunaSearch + ASHAScheduler as a user would wire them by hand (Ray's defaults: pruned
     trials told to Optuna as COMPLETE, grace period 1, reduction factor 4): the anchor;
  b. dkd-tune's search (pruned trials told as PRUNED, TPE's start-up, the file's rungs);
  c. b with `beta: auto`: first trials at auto-beta's prediction and window, the model refitted
     without the teacher (leave-one-teacher-out);
  d. c with a deliberately wrong calibration: every prediction shifted up by 3 octaves (x8).

    python benchmarks/search_efficiency.py --validation dkd_runs/validate_synthetic --out /tmp/efficiency
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.beta_ground_truth import grid_from_results
from analysis.grid_curves import curves_from_long, epochs_to_target
from analysis.tables import markdown_table
from dkd_tune.config.loading import load_search_space
from dkd_tune.search.replay import replay_search, run_replay
from dkd_tune.teacher.auto_beta import CalibrationPoint, beta_prior, fit_calibration, surface_calibration
from dkd_tune.teacher.beta_surface import fit_surface

TOLERANCE = 0.5  # points of test top-1 below the oracle that count as found
WRONG_SHIFT = 8.0  # the wrong calibration's factor: 3 octaves


def held_out_prior(grid, teacher_index: int, shift: float = 1.0):
    """Auto-beta's prior for one teacher from a surface fitted on the other teachers, optionally shifted."""
    others = [i for i in range(len(grid.teachers)) if i != teacher_index]
    means = grid.val.mean(axis=2)
    surface = fit_surface(
        grid.gaps[others], grid.log2_betas, means[others], noise_variance=grid.noise_variance()
    )
    points = [
        CalibrationPoint(grid.teachers[i], float(grid.gaps[i]), float(grid.betas[means[i].argmax()]), "grid")
        for i in others
    ]
    calibration = surface_calibration(fit_calibration(points, "synthetic", "held out"), surface)
    prior = beta_prior(calibration, float(grid.gaps[teacher_index]))
    if shift == 1.0:
        return prior
    import dataclasses

    s = prior.suggestion
    shifted = dataclasses.replace(s, beta=s.beta * shift, low=s.low * shift, high=s.high * shift)
    return dataclasses.replace(prior, suggestion=shifted)


def anchor_search(curves, teacher: str, seed_index: int, seed: int, trials: int, beta_range):
    """Ray's OptunaSearch and ASHAScheduler with their defaults, as a user would wire them by hand."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space={"beta": optuna.distributions.FloatDistribution(*beta_range, log=True)},
        metric="val_acc",
        mode="max",
        seed=seed,
    )
    scheduler = ASHAScheduler(time_attr="epoch", max_t=curves.epochs)
    return run_replay(curves, teacher, seed_index, searcher, scheduler, trials)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation", type=Path, required=True, help="a finished validate-beta folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--search-seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16, help="trials per search")
    parser.add_argument(
        "--summary-only", action="store_true", help="summarise the search_efficiency.parquet already in --out"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import ray

    state = json.loads((args.validation / "validation.json").read_text())
    grid_dir = args.validation / f"{state['name']}-grid"
    grid = grid_from_results(pd.read_parquet(grid_dir / "results.parquet"))
    curves = curves_from_long(pd.read_parquet(args.validation / "curves.parquet"))
    space = load_search_space(args.validation / "validate.yaml")
    space = space.model_copy(
        update={"search": space.search.model_copy(update={"algorithm": "optuna", "num_samples": args.trials})}
    )
    beta_range = (float(grid.betas[0]), float(grid.betas[-1]))
    oracle = grid.val.mean(axis=2).argmax(axis=1)
    budget = args.trials * curves.epochs
    if args.summary_only:
        frame = pd.read_parquet(args.out / "search_efficiency.parquet")
        print(markdown_table(summarise(frame, budget, grid)))
        return
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    started = time.time()
    for i, teacher in enumerate(grid.teachers):
        priors = {"c": held_out_prior(grid, i), "d": held_out_prior(grid, i, WRONG_SHIFT)}
        for seed in range(args.search_seeds):
            k = seed % len(grid.seeds)
            target = grid.test[i, oracle[i], k] - TOLERANCE
            runs = {
                "a": anchor_search(curves, teacher, k, seed, args.trials, beta_range),
                "b": replay_search(space, curves, teacher, k, beta_range=beta_range, search_seed=seed),
            }
            for variant, prior in priors.items():
                points = [{"beta": min(max(b, beta_range[0]), beta_range[1])} for b in prior.first_betas()]
                runs[variant] = replay_search(
                    space, curves, teacher, k, beta_range=beta_range, first_points=points, search_seed=seed
                )
            for variant, run in runs.items():
                rows.append(
                    {
                        "variant": variant,
                        "teacher": teacher,
                        "search_seed": seed,
                        "grid_seed": grid.seeds[k],
                        "epochs_to_target": epochs_to_target(run.trials, target),
                        "total_epochs": run.trial_epochs,
                        "chosen_beta": run.chosen_beta,
                    }
                )
        print(f"{teacher}: done ({time.time() - started:.0f} s)", flush=True)
    ray.shutdown()
    frame = pd.DataFrame(rows)
    frame.to_parquet(args.out / "search_efficiency.parquet", index=False)
    summary = summarise(frame, budget, grid)
    text = (
        f"{len(grid.teachers)} teachers x {args.search_seeds} search seeds, {args.trials} trials per search, "
        f"{curves.epochs} epochs per full trial; target: within {TOLERANCE} points of the oracle's test top-1; "
        f"{time.time() - started:.0f} s in all\n\n" + markdown_table(summary)
    )
    (args.out / "search_efficiency.md").write_text(text + "\n")
    print(text)


def summarise(frame: pd.DataFrame, budget: int, grid) -> pd.DataFrame:
    """Per variant: searches reaching the target, compute to get there (a search that never does counts the
    whole budget, so the mean is a lower bound), compute spent, and the regret of the beta each search chose."""
    names = {
        "a": "a. Ray OptunaSearch + ASHA, by hand",
        "b": "b. dkd-tune search",
        "c": "c. b + beta: auto (held out)",
        "d": "d. c, calibration 3 octaves off",
    }
    oracle = grid.val.mean(axis=2).argmax(axis=1)

    def regret(row) -> float:
        i, k = grid.teachers.index(row.teacher), grid.seeds.index(int(row.grid_seed))
        if not math.isfinite(row.chosen_beta):
            return math.nan
        j = int(np.argmin(np.abs(np.log2(grid.betas) - math.log2(row.chosen_beta))))
        return float(grid.test[i, oracle[i], k] - grid.test[i, j, k])

    frame = frame.assign(regret=[regret(row) for row in frame.itertuples()])
    rows = []
    for variant, group in frame.groupby("variant"):
        values = group["epochs_to_target"].to_numpy()
        capped = np.where(np.isfinite(values), values, budget)
        rows.append(
            {
                "search": names[variant],
                "reached target": f"{int(np.isfinite(values).sum())}/{len(values)}",
                "mean trial-epochs to target (>=)": float(capped.mean()),
                "25th percentile": float(np.percentile(capped, 25)),
                "mean trial-epochs spent": float(group["total_epochs"].mean()),
                "regret of the chosen beta (mean, sd)": f"{group['regret'].mean():.2f} ({group['regret'].std():.2f})",
            }
        )
    table = pd.DataFrame(rows)
    anchor, ours = table.iloc[0, 2], table.iloc[1, 2]
    # How many times less compute than the anchor, and compute relative to dkd-tune's search.
    table["a / this"] = [anchor / value for value in table.iloc[:, 2]]
    table["this / b"] = [value / ours for value in table.iloc[:, 2]]
    return table


if __name__ == "__main__":
    main()
