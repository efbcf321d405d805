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
    # The one command a GPU session runs, in its CPU smoke mode: peak memory, packing, step throughput.
    result = run_script("benchmarks/gpu.py", "--out", str(tmp_path), "--device", "cpu", "--tiny", cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("exit 0") == 3, summary
    markdown = (tmp_path / "benchmarks.md").read_text()
    for title in (
        "## Peak memory of a trial: live teacher vs logit cache",
        "## GPU packing: aggregate throughput",
        "## DKD training throughput: reference loop vs dkd-tune",
    ):
        assert title in markdown
    packing = json.loads((tmp_path / "packing.json").read_text())
    assert [row["count"] for row in packing] == [1, 2]
    assert all(row["aggregate_images_per_s"] > 0 for row in packing)
    steps = json.loads((tmp_path / "training_step.json").read_text())["rows"][0]
    assert set(steps["images_per_s"]) == {"reference", "live", "cache", "floor"}
    memory = json.loads((tmp_path / "cifar_epoch_memory.json").read_text())["results"]
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


@pytest.mark.slow
def test_rung_correlation_runs_and_writes_its_curves(tmp_path):
    result = run_script("benchmarks/rung_correlation.py", "--tiny", "--out", str(tmp_path), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(c["beta"], len(c["test_acc"])) for c in saved["curves"]] == [(1.0, 2), (8.0, 2)]
    assert "| rung (epoch) |" in result.stdout


def test_spearman_matches_its_definition_with_ties():
    from benchmarks.rung_correlation import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their average rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3).
    assert spearman([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
