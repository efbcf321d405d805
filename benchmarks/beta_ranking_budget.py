"""Is a beta grid's budget long enough? Compare the ranking of betas at the benchmark's budget with 3x that budget.

Reads two finished grid searches over beta x seed (results.parquet of each: the validation's
`<name>-grid` and a `dkd-tune run` of the same teachers at 3x the epochs) and prints, per teacher
in both, the Spearman correlation between the betas' mean validation top-1 at the two budgets
and the best beta at each. A budget is long enough when the rankings agree.

    python benchmarks/beta_ranking_budget.py \
        --short dkd_runs/validate_synthetic/validate_synthetic-grid --long dkd_runs/validate_synthetic_3x
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.beta_ground_truth import grid_from_results, ranking_agreement
from analysis.tables import markdown_table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--short", type=Path, required=True, help="folder of the grid at the benchmark's budget"
    )
    parser.add_argument("--long", type=Path, required=True, help="folder of the same grid at 3x the budget")
    args = parser.parse_args(argv)
    short = grid_from_results(pd.read_parquet(args.short / "results.parquet"))
    long = grid_from_results(pd.read_parquet(args.long / "results.parquet"))
    table = ranking_agreement(short, long)
    epochs = {
        name: int(pd.read_parquet(folder / "results.parquet")["max_epochs"].max())
        for name, folder in (("short", args.short), ("long", args.long))
    }
    text = (
        f"Ranking of betas by mean validation top-1: {epochs['short']} epochs ({len(short.seeds)} seeds) vs "
        f"{epochs['long']} epochs ({len(long.seeds)} seeds)\n\n" + markdown_table(table)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
