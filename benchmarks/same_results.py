"""Do two runs of the same search give bit-identical results? (a refactoring's check, not a timing)

Running one search file twice is up to the caller (before and after a change, same seed); this compares
the two folders: every trial's values, status and final scores in `results.parquet` (exactly, not
approximately), every epoch each trial reported, and every tensor of the teachers' checkpoints.
What is allowed to differ: wall-clock times and throughputs, paths, and Ray's random trial ids.

    python benchmarks/same_results.py BEFORE/<search> AFTER/<search> --teachers BEFORE/teachers AFTER/teachers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from dkd_tune.core.checkpoint_file import read_checkpoint_file

# Columns and metrics that measure the machine or name a place, not what was learnt.
VARYING = ("wall_time_s", "checkpoint_path", "trial_id", "config_json", "sha256")
TIMING_MARKERS = ("time", "_per_s", "_ms")


def learnt(record: dict) -> dict:
    return {
        key: value
        for key, value in record.items()
        if key not in VARYING and not any(marker in key for marker in TIMING_MARKERS)
    }


def trial_table(search: Path) -> pd.DataFrame:
    frame = pd.read_parquet(search / "results.parquet")
    frame = frame.drop(columns=[column for column in VARYING if column in frame])
    return frame.sort_values([column for column in ("part", "beta", "seed") if column in frame]).reset_index(
        drop=True
    )


def epoch_histories(search: Path) -> list[list[dict]]:
    where = ("date", "pid", "hostname", "node_ip", "checkpoint_dir_name")  # Ray's: where a result arrived
    histories = []
    for path in sorted(search.glob("*/*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        histories.append([{k: v for k, v in learnt(row).items() if k not in where} for row in rows])
    return sorted(histories, key=lambda history: json.dumps(history, sort_keys=True, default=str))


def tensors(checkpoint: Path) -> dict[str, object]:
    flat: dict[str, object] = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}/{key}")
        elif torch.is_tensor(value):
            flat[prefix] = value

    walk(read_checkpoint_file(checkpoint), "")
    return flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--teachers", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    before, after = trial_table(args.before), trial_table(args.after)
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    print(f"results.parquet: {len(before)} trials x {len(before.columns)} columns identical")
    histories = epoch_histories(args.before), epoch_histories(args.after)
    assert histories[0] == histories[1], "the trials' per-epoch reports differ"
    print(f"per-epoch reports: {sum(map(len, histories[0]))} identical")
    if args.teachers:
        for path in sorted(args.teachers[0].rglob("*.pt")):
            other = args.teachers[1] / path.relative_to(args.teachers[0])
            first, second = tensors(path), tensors(other)
            assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), (
                path
            )
            print(f"teacher {path.relative_to(args.teachers[0])}: {len(first)} tensors identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
