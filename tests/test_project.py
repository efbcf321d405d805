"""Packaging and documentation invariants: the README's commands, CI, the installed entry points."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_quickstart_has_exactly_the_demo_and_test_commands():
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert len(commands) == 2
    demo, tests = commands
    assert demo.startswith("python3 -m venv") and demo.endswith("dkd-tune run search_spaces/demo.yaml")
    assert tests.startswith("python3 -m venv") and "[test]" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert "set -euo pipefail" in ci_lines


def test_cli_help_and_version():
    help_text = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Decoupled Knowledge Distillation" in help_text
    version = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "--version"], capture_output=True, text=True, check=True
    ).stdout
    from dkd_tune import __version__

    assert __version__ in version


def test_unknown_command_is_one_line_and_exit_code_2():
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "no-such-command"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_non_editable_install_works_from_any_directory(tmp_path):
    """`pip install .` into a fresh venv, then the console script and the packages work from /."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Reuse this environment's installed dependencies (a .pth file) and install only dkd-tune itself.
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site_packages) / "outer_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, cwd=tmp_path
    )
    subprocess.run([str(venv / "bin" / "dkd-tune"), "--help"], check=True, cwd="/", capture_output=True)
    probe = "import dkd_tune, trainables, analysis; print(dkd_tune.__file__)"
    location = subprocess.run(
        [str(python), "-c", probe], check=True, cwd="/", capture_output=True, text=True
    ).stdout
    assert str(venv) in location, location


def test_the_core_imports_torch_only():
    """The floors below the search file run on a machine whose Python has torch but not Ray, MLflow or pandas."""
    core = [
        "core.losses", "core.recipes", "core.errors", "core.files", "core.progress", "core.checkpoint_file",
        "models", "data", "engine.loop", "engine.run_setup", "engine.devices", "teacher.gap",
        "teacher.logit_cache", "teacher.preparation", "teacher.auto_beta", "teacher.logit_interventions",
        "probe", "trial", "models.detection", "data.coco", "data.synthetic_coco", "engine.detection_loop",
        "engine.detection_setup", "engine.detection_eval", "teacher.detection_gap", "teacher.detector_preparation",
    ]  # fmt: skip
    probe = (
        f"import {', '.join('dkd_tune.' + module for module in core)}; import sys; "
        "print(sorted(m for m in ('ray', 'mlflow', 'optuna', 'pandas', 'pyarrow', 'pydantic', 'click', 'yaml', "
        "'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


def test_imports_point_down_the_floors():
    """import-linter's contracts (pyproject.toml): no import up a floor, no cycle, torch-only floors."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 7 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    "probe_file, probe_line, broken",
    [
        ("dkd_tune/data/dataset.py", "import dkd_tune.models.registry", "Floors"),
        ("trainables/distill.py", "import dkd_tune.search.driver", "Floors"),
        ("dkd_tune/unlisted.py", "import dkd_tune.search.driver", "on a floor"),
        ("dkd_tune/core/errors.py", "import rich", "Floors 0-3"),
        ("dkd_tune/engine/loop.py", "import requests", "Floors 0-3"),
        ("dkd_tune/config/loading.py", "import ray", "do not need Ray"),
        ("analysis/tables.py", "import ray", "do not need Ray"),
        ("dkd_tune/search/driver.py", "import mlflow", "MLflow is called from tracking's MLflow store only"),
        ("dkd_tune/tracking/runs.py", "import mlflow", "MLflow is called from tracking's MLflow store only"),
        ("dkd_tune/search/driver.py", "import dkd_tune.tracking.mlflow_store", "Tracking is one door"),
    ],
)
def test_an_import_against_the_floors_breaks_a_contract(tmp_path, probe_file, probe_line, broken):
    """Each probe (one import the README forbids, in a copy of the code) breaks the contract it should."""
    for part in ("dkd_tune", "analysis", "trainables"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "__init__.py", tmp_path / "tests")
    shutil.copy(ROOT / "tests" / "import_contracts.py", tmp_path / "tests")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / probe_file
    target.write_text((target.read_text() if target.exists() else "") + f"\n{probe_line}\n")
    lint = Path(sys.executable).with_name("lint-imports")
    wide = {**os.environ, "COLUMNS": "400"}  # one contract name per line
    result = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=tmp_path, env=wide)
    assert result.returncode == 1, result.stdout[-3000:]
    broken_lines = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken_lines) == 1 and broken in broken_lines[0], result.stdout[-3000:]
