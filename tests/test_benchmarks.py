"""The benchmark scripts run end to end in their seconds-long --tiny mode (nothing is timed or asserted on speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.timing import interleaved_rounds, write_section

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=900
    )


def test_interleaved_rounds_rotate_the_starting_contender():
    calls = []
    results, loads = interleaved_rounds(
        {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}, rounds=3
    )
    assert calls == list("abcbcacab")
    assert results == {"a": [1, 6, 8], "b": [2, 4, 9], "c": [3, 5, 7]}
    assert len(loads) == 3


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## One\n\nold one\n\n## Two\n\nkept\n")
    write_section(path, "## One", "## One\n\nnew one\n")
    write_section(path, "## Three", "## Three\n\nadded\n")
    assert path.read_text() == "# Benchmarks\n\n## One\n\nnew one\n\n## Two\n\nkept\n\n## Three\n\nadded\n"


@pytest.mark.slow
def test_gpu_command_runs_every_step_on_the_cpu(tmp_path):
    import re

    # What a GPU session runs by default, in its CPU smoke mode: the main path (a packed search,
    # Ctrl-C, resume, a second student) and the profile.
    default = tmp_path / "default"
    result = run_script("benchmarks/gpu.py", "--out", str(default), "--device", "cpu", "--tiny", cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (default / "summary.txt").read_text()
    assert summary.count("exit 0") == 2 and summary.startswith("search:"), summary
    search = (default / "gpu_search.md").read_text()
    for step, code in (("run_interrupted", 130), ("resume", 0), ("run_resnet8x4", 0)):
        assert re.search(rf"\| {step} \| `[^`]*` \| {code} \|", search), (step, search[:2000])
    profile = json.loads((default / "gpu_profile.json").read_text())
    assert all(speed > 0 for row in profile.values() for speed in row["speeds"].values())

    # The earlier measurements, on request: peak memory, packing, step throughput.
    earlier = tmp_path / "earlier"
    result = run_script(
        "benchmarks/gpu.py", "--out", str(earlier), "--device", "cpu", "--tiny",
        "--steps", "cifar_epoch_memory", "packing", "training_step", cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (earlier / "summary.txt").read_text()
    assert summary.count("exit 0") == 3, summary
    markdown = (earlier / "benchmarks.md").read_text()
    for title in (
        "## Peak memory of a trial: live teacher vs logit cache",
        "## GPU packing: aggregate throughput",
        "## DKD training throughput: reference loop vs dkd-tune",
    ):
        assert title in markdown
    packing = json.loads((earlier / "packing.json").read_text())
    assert [row["count"] for row in packing] == [1, 2]
    assert all(row["aggregate_images_per_s"] > 0 for row in packing)
    steps = json.loads((earlier / "training_step.json").read_text())["rows"][0]
    assert set(steps["images_per_s"]) == {"reference", "live", "cache", "floor"}
    memory = json.loads((earlier / "cifar_epoch_memory.json").read_text())["results"]
    assert memory["cache"]["epochs"] == memory["live"]["epochs"] == 1


@pytest.mark.slow
def test_search_overhead_runs_a_one_trial_search(tmp_path):
    out = tmp_path / "benchmarks.md"
    result = run_script(
        "benchmarks/search_overhead.py",
        "--tiny",
        "--out",
        str(out),
        "--json",
        str(tmp_path / "r.json"),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "## Search overhead" in out.read_text()
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["search"][0]["epochs"] == raw["direct"][0]["fit_epochs"] == 3
    assert 0 < raw["search"][0]["ray_time_total"] <= raw["search"][0]["trial_wall"]


def test_beta_ranking_budget_compares_two_grids(tmp_path):
    import pandas as pd

    from analysis.results import typed_results
    from benchmarks.beta_ranking_budget import main

    for name, epochs, flip in (("short", 30, False), ("long", 90, True)):
        rows = []
        for beta, acc in ((0.5, 60.0), (1.0, 65.0), (2.0, 63.0)):
            for seed in (0, 1):
                value = 70.0 - acc + 60.0 if flip and beta == 2.0 else acc
                rows.append(dict(part="t", teacher="t", teacher_gap=1.0, beta=beta, seed=seed, status="completed",
                                 final_val_acc=value, final_test_acc=value, max_epochs=epochs,
                                 trial_id=f"{name}{beta}{seed}"))  # fmt: skip
        (tmp_path / name).mkdir()
        typed_results(pd.DataFrame(rows)).to_parquet(tmp_path / name / "results.parquet")
    text = main(["--short", str(tmp_path / "short"), "--long", str(tmp_path / "long")])
    assert "30 epochs (2 seeds) vs 90 epochs (2 seeds)" in text
    assert "| t | 0.5 | 1 | 2 |" in text  # beta 2 overtakes at 3x: the rankings disagree in part


def test_search_efficiency_scores_the_incumbent_not_a_blind_pick():
    import math

    import numpy as np
    import pandas as pd

    from benchmarks.search_efficiency import anytime_regret, choose_delta, regret_at, summarise, time_to

    arm_regret = np.array([3.0, 1.0, 0.0, 2.0])  # blind pick: their mean, 1.5
    # (grid index, epochs run, reached the end?, final validation top-1); 10 epochs a full trial
    trials = [(0, 10, True, 50.0), (2, 3, False, 0.0), (1, 10, True, 52.0), (3, 10, True, 51.0)]
    times, regrets, found = anytime_regret(trials, arm_regret)
    assert list(times) == [0, 10, 13, 23, 33]
    assert list(regrets) == [1.5, 3.0, 3.0, 1.0, 1.0]  # the pruned trial changes nothing; 3 is worse on val
    assert list(found) == [False, True, True, True, True]
    assert regret_at(times, regrets, 20) == 3.0 and regret_at(times, regrets, 23) == 1.0
    assert time_to(times, regrets, found, 1.0, horizon=40) == 23
    assert time_to(times, regrets, found, 0.5, horizon=40) == math.inf
    # The blind pick meets a 2-point target at time 0, but no search has chosen anything then.
    assert time_to(times, regrets, found, 2.0, horizon=40) == 23
    assert time_to(times, regrets, found, 1.0, horizon=20) == math.inf  # past the horizon: censored

    def search(variant: str, teacher: str, hit_at: float | None) -> dict:
        hit = hit_at if hit_at is not None else 99.0
        return {
            "family": "f", "teacher": teacher, "seed": 0, "variant": variant,
            "times": np.array([0.0, 1.0, hit]), "regrets": np.array([2.0, 2.0, 0.0]),
            "found": np.array([False, True, True]), **{f"regret@{b}": 0.0 for b in (1, 2, 4, 8)},
        }  # fmt: skip

    scores = pd.DataFrame(
        [search("b", "t0", 2.0), search("b", "t1", 4.0), search("c+0", "t0", 1.0), search("c+0", "t1", None)]
    )
    assert (
        choose_delta(scores) == 2.0
    )  # at 0.25 half of (c+0)'s searches are censored; 2 points are met at once
    table = summarise(scores, delta=0.25, resamples=200).set_index("variant")
    assert table.loc["b", "censored"] == "0%" and table.loc["c+0", "censored"] == "50%"
    # RMST: a censored search counts the 8-trial horizon; (b) 3.0, (c+0) (1 + 8) / 2 = 4.5, ratio 1.5
    assert table.loc["b", "RMST (full trials)"].startswith("3.00")
    assert table.loc["c+0", "RMST (full trials)"].startswith("4.50")
    assert table.loc["c+0", "/ b"].startswith("1.50")
