"""The state files of a search (`state.json`) and of a validation (`validation.json`): typed, versioned, read and
written here only."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from dkd_tune.config.folders import STATE_FILE, VALIDATION_STATE_FILE
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.files import atomic_write_json
from dkd_tune.teacher.preparation import TeacherArtifacts

# 1: the untyped dict written before this module (the same keys, no `version`); 2: this module's.
STATE_VERSION = 2

Status = Literal["running", "interrupted", "done"]
TrackingSync = Literal["synced", "pending"]


@dataclass
class SearchState:
    """What a search has done: its teachers, finished parts, MLflow parent run and where it stopped."""

    name: str
    source: str
    created: str
    tracking_uri: str
    teachers: dict[str, TeacherArtifacts] = field(default_factory=dict)  # by label, once prepared
    parts_done: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    status: Status = "running"
    tracking: TrackingSync | None = None  # at the end: does MLflow hold the finished search?
    probes_done: bool = False

    @classmethod
    def new(cls, name: str, source: Path | str, tracking_uri: str) -> SearchState:
        return cls(name=name, source=str(source), created=_now(), tracking_uri=tracking_uri)

    def save(self, folder: Path) -> None:
        record = dataclasses.asdict(self) | {
            "teachers": {label: artifacts.to_dict() for label, artifacts in self.teachers.items()}
        }
        atomic_write_json(folder / STATE_FILE, {"version": STATE_VERSION, **record})

    @classmethod
    def load(cls, folder: Path) -> SearchState:
        """The state of the search in `folder`, or one line saying why it cannot be used to resume."""
        path = folder / STATE_FILE
        record = _read_record(path, required=("name", "tracking_uri", "teachers", "parts_done"))
        try:
            return cls(
                name=str(record["name"]),
                source=str(record.get("source", "")),
                created=str(record.get("created", "")),
                tracking_uri=str(record["tracking_uri"]),
                teachers={
                    str(label): TeacherArtifacts.from_dict(entry)
                    for label, entry in record["teachers"].items()
                },
                parts_done=[str(part) for part in record["parts_done"]],
                parent_run_id=record.get("parent_run_id"),
                status=_checked(path, "status", record.get("status", "running"), get_args(Status)),
                tracking=_checked(path, "tracking", record.get("tracking"), (*get_args(TrackingSync), None)),
                probes_done=bool(record.get("probes_done", False)),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise _foreign(path, f"unreadable entry: {error}") from None


@dataclass
class ValidationState:
    """What a `validate-beta` run has done: its MLflow run, its sessions (start, end, outcome) and where it stopped."""

    name: str
    source: str
    command: str
    created: str
    tracking_uri: str
    validation_run_id: str | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)
    status: Status = "running"

    @classmethod
    def new(cls, name: str, source: Path | str, command: str, tracking_uri: str) -> ValidationState:
        return cls(name=name, source=str(source), command=command, created=_now(), tracking_uri=tracking_uri)

    def save(self, folder: Path) -> None:
        atomic_write_json(
            folder / VALIDATION_STATE_FILE, {"version": STATE_VERSION, **dataclasses.asdict(self)}
        )

    @classmethod
    def load(cls, folder: Path) -> ValidationState:
        path = folder / VALIDATION_STATE_FILE
        record = _read_record(path, required=("name", "tracking_uri", "sessions"))
        try:
            return cls(
                name=str(record["name"]),
                source=str(record.get("source", "")),
                command=str(record.get("command") or ""),
                created=str(record.get("created", "")),
                tracking_uri=str(record["tracking_uri"]),
                validation_run_id=record.get("validation_run_id"),
                sessions=[dict(session) for session in record["sessions"]],
                status=_checked(path, "status", record.get("status", "running"), get_args(Status)),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise _foreign(path, f"unreadable entry: {error}") from None


def _read_record(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else " ".join(str(error).split())
        raise UserInputError(
            f"{path}: cannot read the search's state ({reason}); expected the JSON file dkd-tune wrote"
        ) from None
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise _foreign(path, f"missing {', '.join(missing)}")
    version = record.get("version", 1)
    if not isinstance(version, int) or version > STATE_VERSION:
        raise UserInputError(
            f"{path}: version {version!r}: written by a newer dkd-tune (this one reads state versions 1 to "
            f"{STATE_VERSION}); upgrade dkd-tune to resume this search"
        )
    return record


def _checked(path: Path, key: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """`value` if it is one of `allowed`, else one line naming the file, the key and what was expected."""
    if value not in allowed:
        shown = ", ".join(repr(option) for option in allowed)
        raise UserInputError(f"{path}: {key} {value!r}: expected one of {shown}")
    return value


def _foreign(path: Path, why: str) -> UserInputError:
    return UserInputError(f"{path}: not a search state file ({why}); expected the JSON file dkd-tune wrote")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
