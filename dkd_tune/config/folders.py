"""Where a search keeps its files: their names, and finding a search by name or folder."""

from __future__ import annotations

from pathlib import Path

from dkd_tune.core.errors import UserInputError

STATE_FILE = "state.json"


VALIDATION_STATE_FILE = "validation.json"  # a validate-beta folder's state


CONFIG_FILE = "search.yaml"


RESULTS_FILE = "results.parquet"


PROBES_FILE = "probes.parquet"


def locate_search(name_or_path: str, storage: str | None) -> Path:
    candidates = [Path(name_or_path).expanduser()]
    candidates.append(Path(storage or "./dkd_runs").expanduser() / name_or_path)
    for candidate in candidates:
        if (candidate / STATE_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    raise UserInputError(
        f"search {name_or_path!r}: not found (looked for {STATE_FILE} in "
        f"{' and '.join(str(c) for c in candidates)}); pass the search's folder or --storage"
    )


def resume_command(experiment_dir: Path) -> str:
    """The exact command that continues the search in `experiment_dir`, from the current directory."""
    return f"dkd-tune resume {command_target(experiment_dir)}"


def command_target(experiment_dir: Path) -> str:
    """How a command names the search: its name under the default storage, else its folder."""
    return (
        experiment_dir.name if experiment_dir.parent == Path("./dkd_runs").resolve() else str(experiment_dir)
    )
