"""Which MLflow tracking URIs a search or a run accepts, checked before anything starts."""

from __future__ import annotations

from importlib.metadata import entry_points
from urllib.parse import urlsplit

from dkd_tune.core.errors import UserInputError

# The URI schemes MLflow's tracking store registry knows ('' is a local folder), plus plugins' schemes.
MLFLOW_SCHEMES = (
    "",
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)


def check_tracking_uri(uri: str | None, source: str) -> None:
    """A tracking URI of a kind MLflow can open (checked without opening it: nothing is created)."""
    if not uri:
        return
    scheme = urlsplit(uri).scheme
    if scheme in MLFLOW_SCHEMES or (len(scheme) == 1 and uri[1:2] == ":"):  # C:\... is a folder
        return
    plugins = {entry.name for entry in entry_points(group="mlflow.tracking_store")}
    if scheme not in plugins:
        raise UserInputError(
            f"{source} {uri!r}: unknown scheme {scheme!r}; expected an MLflow store such as "
            "sqlite:///path/mlflow.db, a folder, or http(s)://host:port"
        )
