"""How a search is run (name, storage, tracking, Ray address, logger) and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SearchOptions:
    """Command-line choices that are not part of the search-space file."""

    name: str | None = None
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    dashboard: bool = False
    log: Callable[[str], None] = print
    # 0 (-q): the summary only; 1: a line per finished trial; 2 (-v): Ray Tune's tables and the libraries' logs.
    verbosity: int = 1
    # A function trainable `(config, plan, data)` to run instead of dkd-tune's own: for custom training
    # code, and for the tests that inject faults or measure the search machinery with a fast trainable.
    trainable: Callable[..., None] | None = None
    # An MLflow run to nest the search's parent run under (`dkd-tune validate-beta` runs two searches).
    parent_run_id: str | None = None
    # Where trained teachers are kept (default: `<storage>/teachers`); validations share their storage's.
    teachers_dir: str | None = None
    # Each teacher's best student registered in MLflow's Model Registry (a validation's grid needs none).
    register_students: bool = True


@dataclass
class SearchOutcome:
    experiment_dir: Path
    results_path: Path
    best: dict[str, Any] | None
    table: str
    references: dict[str, float]  # baseline part -> its final test top-1, for comparison with the best
