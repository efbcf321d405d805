"""Which tracking store a URI opens: the user's URI, MLFLOW_TRACKING_URI, or MLflow's default."""

from __future__ import annotations

from pathlib import Path

from dkd_tune.tracking.store import TrackingStore


def open_store(uri: str | None, *, short_retries: bool = False) -> TrackingStore:
    """The store at `uri` (else MLFLOW_TRACKING_URI, else MLflow's default). `short_retries`: a search's
    store, whose missed calls are delivered later, fails fast instead of retrying for minutes."""
    from dkd_tune.tracking.mlflow_store import MlflowStore

    return MlflowStore(resolve_tracking_uri(uri), short_retries=short_retries)


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI to use: the user's, else MLFLOW_TRACKING_URI, else MLflow's own default (./mlflow.db)."""
    from dkd_tune.tracking.mlflow_store import default_tracking_uri

    return uri or default_tracking_uri()


def absolute_tracking_uri(uri: str | None) -> str:
    """`resolve_tracking_uri`, with a relative SQLite path made absolute (a resume may run elsewhere)."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri
