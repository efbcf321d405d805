"""The commands in the README's and docs' code blocks: each `dkd-tune` line parses, each search file it names
validates, and the ones that need no dataset, GPU or hours run.

Running every block is not practical here (a CIFAR-100 search takes days on a GPU); what would go
stale silently is a renamed subcommand or option, a moved search file or a key the schema no longer
takes, and those are what this checks for every line.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from dkd_tune.cli import cli
from dkd_tune.config.loading import apply_set_override, read_yaml_mapping
from dkd_tune.config.schema import SearchSpaceFile

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_HERE = {"models", "schema"}  # subcommands the docs show that need no data, GPU or network


def shell_blocks(page: Path) -> list[str]:
    return re.findall(r"^```(?:bash|sh)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def docs_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `dkd-tune`) of every `dkd-tune` command in a shell block (after `&&` too)."""
    found = []
    for page in PAGES:
        for block in shell_blocks(page):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for start, word in enumerate(words):
                    if word == "dkd-tune":
                        argv = words[start + 1 :]
                        argv = argv[: argv.index("&&")] if "&&" in argv else argv
                        found.append((f"{page.name}: {line.strip()[:70]}", argv))
    return found


COMMANDS = docs_commands()


def test_the_docs_show_commands_of_most_subcommands():
    shown = {argv[0] for _, argv in COMMANDS if argv}
    assert len(COMMANDS) >= 30 and {"run", "resume", "suggest-beta", "validate-beta", "distill"} <= shown


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_dkd_tune_line_in_the_docs_parses(where, argv):
    # The placeholder the docs use for "your file" stands for a real one.
    argv = ["search_spaces/demo.yaml" if word == "SPACE.yaml" else word for word in argv]
    try:
        context = cli.make_context("dkd-tune", list(argv), resilient_parsing=False)
        command = cli.get_command(context, argv[0])
        assert command is not None, f"{where}: no subcommand {argv[0]!r}"
        command.make_context(argv[0], argv[1:], parent=context)
    except click.exceptions.UsageError as error:
        pytest.fail(f"{where}: {error.format_message()}")


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_search_file_the_docs_run_exists_and_validates(where, argv):
    files = [word for word in argv if word.startswith("search_spaces/") and word.endswith(".yaml")]
    sets = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--set"]
    for name in files:
        assert (ROOT / name).is_file(), f"{where}: {name} does not exist"
        raw = read_yaml_mapping(ROOT / name)
        for assignment in sets:
            apply_set_override(raw, assignment)
        SearchSpaceFile.model_validate(raw)  # the schema and the data spec; the files on disk are the user's


@pytest.mark.parametrize(
    "argv", sorted({tuple(argv) for _, argv in COMMANDS if argv and argv[0] in RUN_HERE})
)
def test_the_docs_commands_that_need_nothing_run(argv):
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
