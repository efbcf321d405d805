"""Untrusted files cannot run code: checkpoints load with weights_only=True, YAML with safe loading, no shell.

The behavioural tests build files that would run a command if they were loaded unsafely, show
that they do (in a separate process, as the control), and that dkd-tune refuses them with one
line without running anything. A scan of the source complements them: no unsafe loader, no
shell, no subprocess built from a string anywhere in the package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dkd_tune.config.loading import load_search_space
from dkd_tune.core.checkpoint_file import CorruptCheckpointError, load_checkpoint, read_checkpoint_file
from dkd_tune.core.errors import UserInputError
from dkd_tune.models import create_model, load_teacher

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("dkd_tune", "trainables", "analysis", "benchmarks")
MARKER = "code-ran"


class RunsACommand:
    """Unpickling this calls os.system."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture
def malicious_checkpoint(tmp_path) -> Path:
    """A checkpoint whose state dict is genuine but which also carries a pickled call to os.system."""
    path = tmp_path / "teacher.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "extra": RunsACommand()}, path)
    return path


def test_the_malicious_checkpoint_runs_its_command_when_unpickled(malicious_checkpoint, tmp_path):
    """The control: an unsafe load (what `torch.load(weights_only=False)` does) runs the command."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
            "teacher.pth",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert (tmp_path / MARKER).exists()


@pytest.mark.parametrize(
    "load",
    [read_checkpoint_file, load_checkpoint, lambda path: load_teacher("resnet8", path, num_classes=10)],
    ids=["read_checkpoint_file", "load_checkpoint", "load_teacher"],
)
def test_loading_a_malicious_checkpoint_fails_cleanly_without_running_it(
    malicious_checkpoint, tmp_path, monkeypatch, load
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorruptCheckpointError) as refused:
        load(malicious_checkpoint)
    message = str(refused.value)
    assert "\n" not in message and str(malicious_checkpoint) in message
    assert "weights_only=True" in message
    assert not (tmp_path / MARKER).exists()


def test_a_yaml_tag_that_would_run_a_command_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "space.yaml"
    path.write_text(f"name: x\nstudent: !!python/object/apply:os.system ['touch {MARKER}']\n")
    yaml.unsafe_load(path.read_text())  # the control: the unsafe loader runs the command
    assert (tmp_path / MARKER).exists()
    (tmp_path / MARKER).unlink()
    with pytest.raises(UserInputError, match="YAML syntax error"):
        load_search_space(path)
    assert not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------------------
# The source


def package_sources() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_loads_safely_and_never_goes_through_a_shell(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for call, name in calls(tree):
        where = f"{path.relative_to(ROOT)}:{call.lineno}: {name}"
        if name in ("os.system", "os.popen", "os.spawnl", "os.spawnlp", "os.execl", "os.execlp"):
            problems.append(f"{where}: runs a command line")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            problems.append(f"{where}: use yaml.safe_load")
        if name in ("pickle.load", "pickle.loads", "torch.serialization.load"):
            problems.append(f"{where}: unrestricted unpickling")
        if name == "torch.load":
            weights_only = keyword(call, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if name.startswith("subprocess.") or name in ("os.execv", "os.execve", "os.execvp"):
            shell = keyword(call, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f"{where}: shell=")
            command = (
                call.args[1 if name.startswith("os.exec") else 0] if call.args else keyword(call, "args")
            )
            if isinstance(command, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                problems.append(f"{where}: a command line as a string")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_the_calls_it_checks():
    """The scan is not vacuous: the package's one torch.load and its subprocess calls are found."""
    names = [name for path in package_sources() for _, name in calls(ast.parse(path.read_text()))]
    assert names.count("torch.load") == 1
    assert "subprocess.run" in names and "os.execve" in names
