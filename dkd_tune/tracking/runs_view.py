"""A search's view in the MLflow UI: its trials, with the searched parameters and the metric as columns, best first.

The view's state and link only; `mlflow_store.MlflowStore.save_search_view` stores it."""

from __future__ import annotations

from collections.abc import Sequence

# MLflow 3's runs page takes its columns from the browser's storage or from a shared view, never
# from the URL: a shared view is an experiment tag under this prefix, opened by the URL parameter.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
SHARED_VIEW_URL_PARAMETER = "viewStateShareKey"
TAG_VIEW = "dkd_tune.view"  # on the search's run: the key of its shared view
# What the UI sets itself when a view is saved; older 3.x readers take the state as written, without
# filling defaults, so every field is given.
_UI_DEFAULTS = {
    "columnOrder": [],
    "columnWidths": {},
    "runsExpanded": {},
    "runsPinned": [],
    "runsHidden": [],
    "runsVisibilityMap": {},
    "runsHiddenMode": "SHOW_ALL",
    "viewMaximized": False,
    "runListHidden": False,
    "isAccordionReordered": False,
    "groupBy": None,
    "groupsExpanded": {},
    "autoRefreshEnabled": True,
    "useGroupedValuesInCharts": True,
    "hideEmptyCharts": True,
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
}


def view_key(search_run_id: str) -> str:
    """The shared view's key for a search (one per search run; writing it again replaces it)."""
    return f"dkd-tune-{search_run_id}"


def column(kind: str, name: str) -> str:
    """A runs-table column id as the UI names it: params.`beta`, metrics.`val_acc`."""
    return f"{kind}.`{name}`"


def search_view_state(
    search_run_id: str, parameters: Sequence[str], metric: str, mode: str, also_metrics: Sequence[str] = ()
) -> dict:
    """The UI state of a search's view: its trials only (flat), sorted by `metric`, the parameters and
    metrics as the first columns."""
    metrics = list(dict.fromkeys([metric, *also_metrics]))
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{search_run_id}'",
        "orderByKey": column("metrics", metric),
        "orderByAsc": mode == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        **_UI_DEFAULTS,
        "selectedColumns": [column("params", p) for p in parameters]
        + [column("metrics", m) for m in metrics],
    }


def view_url(base: str, experiment_id: str, key: str) -> str:
    """The link that opens a stored view (only the key: the UI ignores a shared view when the link also
    carries a filter or a sort)."""
    return f"{base}/#/experiments/{experiment_id}/runs?{SHARED_VIEW_URL_PARAMETER}={key}"
