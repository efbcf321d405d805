"""Where a search keeps its files: their names, finding a search by name or folder, reading its state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dkd_tune.core.errors import UserInputError

STATE_FILE = "state.json"


CONFIG_FILE = "search.yaml"


RESULTS_FILE = "results.parquet"


PROBES_FILE = "probes.parquet"


STATE_KEYS = ("name", "tracking_uri", "teachers", "parts_done")


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


def read_state(path: Path) -> dict[str, Any]:
    """A search's state file, or one line saying why it cannot be used to resume."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else " ".join(str(error).split())
        raise UserInputError(
            f"{path}: cannot read the search's state ({reason}); expected the JSON file dkd-tune wrote"
        ) from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserInputError(
            f"{path}: not a search state file (missing {', '.join(missing)}); expected the JSON file dkd-tune wrote"
        )
    return state


def resume_command(experiment_dir: Path) -> str:
    """The exact command that continues the search in `experiment_dir`, from the current directory."""
    return f"dkd-tune resume {command_target(experiment_dir)}"


def command_target(experiment_dir: Path) -> str:
    """How a command names the search: its name under the default storage, else its folder."""
    return (
        experiment_dir.name if experiment_dir.parent == Path("./dkd_runs").resolve() else str(experiment_dir)
    )
