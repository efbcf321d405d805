"""End to end: `dkd-tune ui` serves a search and its trials, and the MLflow UI compares them in Chromium.

A real (tiny) search logs to the UI's store through `dkd-tune run`; a headless Chromium then does
what a user does: open the experiment, expand the search, tick the trials, press Compare, and read
each trial's beta, temperature and test_acc off the comparison, checked against MLflow's client.
Without Chromium the test is a loud skip on a developer's machine and a failure in CI.
Set DKD_TUNE_WRITE_SCREENSHOT=1 to refresh docs/images/mlflow-compare.png and mlflow-search-view.png
from this run.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "docs" / "images" / "mlflow-compare.png"
VIEW_SCREENSHOT = ROOT / "docs" / "images" / "mlflow-search-view.png"
# Wide enough that all five trial columns are drawn even beside MLflow's side panels (the
# metrics grid only draws the columns in view); the picture is taken at a README-friendly size.
VIEWPORT = {"width": 1800, "height": 1000}
SCREENSHOT_VIEWPORT = {"width": 1400, "height": 900}
# The UI is a large React app and the machine may be shared: wait long, never sleep.
UI_TIMEOUT_MS = 120_000


@dataclass(frozen=True)
class Trial:
    """A trial of the search as MLflow recorded it, read back through MLflow's client."""

    run_name: str
    run_id: str
    beta: str  # params are strings; the UI shows them as logged
    temperature: str
    test_acc: float  # the last epoch's, which the comparison shows


def run_tiny_search(tmp_path: Path, tracking_uri: str) -> tuple[str, object, list[Trial]]:
    """A real search (tiny: seconds per trial) logged to the UI's store: (experiment id, search run, trials)."""
    from mlflow.tracking import MlflowClient

    from tests.test_search_e2e import cli, tiny_space

    space = tiny_space(
        tmp_path,
        name="browser",
        tracking_uri=tracking_uri,
        baselines=[],
        search={"algorithm": "optuna", "seed": 0, "num_samples": 4, "max_concurrent_trials": 2},
    )
    result = cli("run", str(space), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("browser")
    (search,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dkd_tune.kind` = 'search'"
    )
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{search.info.run_id}'"
    )
    trials = [
        Trial(
            run.info.run_name,
            run.info.run_id,
            run.data.params["beta"],
            run.data.params["temperature"],
            run.data.metrics["test_acc"],
        )
        for run in runs
    ]
    assert len(trials) == 4
    return experiment.experiment_id, search, trials


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium (Playwright cannot download browsers here); a loud skip if it is missing."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":  # CI installs it (.ci/run): its absence there is a failure
            pytest.fail(f"no Chromium at {CHROMIUM}: the browser test cannot run")
        reason = (
            f"BROWSER TEST SKIPPED: no Chromium at {CHROMIUM}; install it "
            "(apt-get install chromium; .ci/run does this) to test the MLflow UI"
        )
        warnings.warn(reason, stacklevel=1)
        print(f"WARNING: {reason}")
        pytest.skip(reason)
    return CHROMIUM


def click_if_shown(locator) -> None:
    """Click a button if the UI shows it: MLflow opens its assistant panel on a first visit, for one."""
    if locator.count() and locator.first.is_visible():
        locator.first.click()


def center(box: dict) -> tuple[float, float]:
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def table_row(page, label: str) -> list[str]:
    """The cells of the comparison table row headed `label`, left to right."""
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=label, exact=True))
    return [text.strip() for text in row.get_by_role("cell").all_inner_texts()]


@pytest.mark.slow
def test_mlflow_ui_compares_trials_beta_and_test_acc(chromium, mlflow_ui, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    from dkd_tune.commands.mlflow_ui import experiment_url, search_view_url
    from dkd_tune.tracking.mlflow_store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
    from dkd_tune.tracking.runs_view import TAG_VIEW

    experiment_id, search, trials = run_tiny_search(tmp_path, mlflow_ui.url)
    search_name = search.info.run_name
    experiment = MlflowClient(tracking_uri=mlflow_ui.url).get_experiment(experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    expect.set_options(timeout=UI_TIMEOUT_MS)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)

            # The search's own view, linked by `dkd-tune ui`: its trials, flat and best first, with the
            # searched parameters and the metric as columns (MLflow's URL alone cannot choose columns).
            page.goto(search_view_url(mlflow_ui.url, experiment_id, search.data.tags[TAG_VIEW]))
            runs = page.get_by_role("grid")
            click_if_shown(page.get_by_role("button", name="Close", exact=True))
            for column in ("params.`beta`", "params.`temperature`", "metrics.`test_acc`"):
                expect(runs.locator(f'[role="columnheader"][col-id="{column}"]')).to_be_visible()
            for trial in trials:
                expect(runs.get_by_role("link", name=trial.run_name, exact=True)).to_be_visible()
            by_name = {trial.run_name: trial for trial in trials}
            shown = [name for name in runs.get_by_role("link").all_inner_texts() if name in by_name]
            assert sorted(shown) == sorted(by_name)  # this search's trials, no other run
            shown_acc = [by_name[name].test_acc for name in shown]
            assert shown_acc == sorted(shown_acc, reverse=True)  # best first (ties in either order)
            for (
                trial
            ) in trials:  # a row is split over the grid's pinned and scrolling parts: its id joins them
                row = runs.locator(f'[role="row"][row-id="{trial.run_id}"]')
                expect(row.locator('[col-id="params.`beta`"]')).to_have_text(trial.beta)
                expect(row.locator('[col-id="metrics.`test_acc`"]')).to_have_text(f"{trial.test_acc:g}")
            view_screenshot = tmp_path / "search-view.png"
            click_if_shown(
                page.get_by_role("button", name="Close", exact=True)
            )  # the assistant, if it opened
            page.screenshot(path=view_screenshot)

            # The link `dkd-tune ui` prints for the experiment: MLflow 3 opens on GenAI traces unless
            # told the "Model training" view; there the search is one row, its trials nested under it.
            # (A fresh page: the shared view above stays active in the page that opened it.)
            page.close()
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(experiment_url(mlflow_ui.url, experiment_id))
            runs = page.get_by_role("grid")
            search_row = runs.get_by_role("row").filter(
                has=page.get_by_role("link", name=search_name, exact=True)
            )
            expect(search_row).to_be_visible()
            click_if_shown(page.get_by_role("button", name="Close", exact=True))
            search_row.get_by_role("button").click()  # the row's expand (+) button
            for trial in trials:
                trial_link = page.get_by_role("link", name=trial.run_name, exact=True)
                trial_row = runs.get_by_role("row").filter(has=trial_link)
                trial_row.get_by_role("checkbox").check()
            page.get_by_role("button", name="Compare", exact=True).click()

            # The comparison page: a column per trial.
            expect(
                page.get_by_role("heading", name=f"Comparing {len(trials)} Runs from 1 Experiment")
            ).to_be_visible()
            click_if_shown(page.get_by_role("button", name="Close", exact=True))
            click_if_shown(page.get_by_role("button", name="Toggle sidebar"))
            run_names = [trial.run_name for trial in trials]
            for name in run_names:
                expect(page.get_by_role("row").filter(has_text="Run Name:")).to_contain_text(name)
            columns = table_row(page, "Run Name:")
            assert sorted(columns) == sorted(run_names)
            by_name = {trial.run_name: trial for trial in trials}

            # Parameters: the beta row holds each trial's beta under its own column.
            assert table_row(page, "beta") == [by_name[name].beta for name in columns]
            assert table_row(page, "temperature") == [by_name[name].temperature for name in columns]

            # Metrics (a virtualised grid, not a table): each trial's last test_acc sits on the
            # test_acc row, under that trial's column.
            test_acc_label = page.get_by_role("link", name="test_acc", exact=True)
            expect(test_acc_label).to_be_visible()
            _, row_y = center(test_acc_label.bounding_box())
            for name in columns:
                column = page.get_by_role("cell", name=name, exact=True).bounding_box()
                shown = f"{by_name[name].test_acc:g}"
                placed = [
                    center(value.bounding_box())
                    for value in page.get_by_role("grid").get_by_text(shown, exact=True).all()
                ]
                assert any(
                    abs(y - row_y) < 10 and column["x"] <= x <= column["x"] + column["width"]
                    for x, y in placed
                ), f"test_acc {shown} of {name} not in its column of the test_acc row (found at {placed})"

            # The parallel-coordinates plot starts on test_acc (logged first) and the searched params.
            plot = page.locator("text=Parallel Coordinates Plot").first
            expect(plot).to_be_visible()
            metrics_box = page.get_by_text("Metrics:", exact=True).locator("xpath=following::*[1]")
            expect(metrics_box).to_contain_text("test_acc")
            expect(metrics_box).not_to_contain_text("epoch")

            # A picture for the README: the parallel-coordinates plot and the parameters that differ.
            page.set_viewport_size(SCREENSHOT_VIEWPORT)
            click_if_shown(page.get_by_role("button", name="Close", exact=True))
            page.get_by_role("button", name="Run details").click()
            page.get_by_role("switch", name="Parameters - Show diff only").click()
            expect(page.get_by_role("rowheader", name="batch_size", exact=True)).to_be_hidden()
            last_row = page.get_by_role("rowheader", name="temperature", exact=True)
            last_row.evaluate("cell => cell.scrollIntoView({block: 'end'})")
            screenshot = tmp_path / "mlflow-compare.png"
            page.screenshot(path=screenshot)
        finally:
            browser.close()

    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DKD_TUNE_WRITE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)
        shutil.copyfile(view_screenshot, VIEW_SCREENSHOT)
