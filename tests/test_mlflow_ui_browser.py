"""End to end: `dkd-tune ui` serves a search and its trials, and the MLflow UI compares them in Chromium.

The store is filled with the structure dkd-tune's tracking logs (an experiment per search space, a
parent run per search, a child run per trial with its hyperparameters as params and per-epoch
metrics); a headless Chromium then does what a user does: open the experiment, expand the search,
tick the trials, press Compare, and read beta and test_acc off the comparison.
Set DKD_TUNE_WRITE_SCREENSHOT=1 to refresh docs/images/mlflow-compare.png from this run.
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
# Wide enough that all five trial columns are drawn even beside MLflow's side panels (the
# metrics grid only draws the columns in view); the picture is taken at a README-friendly size.
VIEWPORT = {"width": 1800, "height": 1000}
SCREENSHOT_VIEWPORT = {"width": 1400, "height": 900}
# The UI is a large React app and the machine may be shared: wait long, never sleep.
UI_TIMEOUT_MS = 120_000

SEARCH = "demo"
TEACHER = "resnet32x4"
STUDENT = "resnet8x4"


@dataclass(frozen=True)
class Trial:
    trial_id: str
    beta: float
    alpha: float
    temperature: float
    test_acc: tuple[float, ...]  # per epoch; the UI shows the last
    status: str

    @property
    def run_name(self) -> str:
        return f"{TEACHER}-{self.trial_id}"


TRIALS = (
    Trial("t000", beta=1.0, alpha=1.0, temperature=4.0, test_acc=(0.312, 0.455, 0.521), status="completed"),
    Trial("t001", beta=2.0, alpha=1.0, temperature=4.0, test_acc=(0.334, 0.478, 0.563), status="completed"),
    Trial("t002", beta=4.0, alpha=0.5, temperature=2.0, test_acc=(0.281, 0.394), status="stopped"),
    Trial("t003", beta=8.0, alpha=2.0, temperature=4.0, test_acc=(0.347, 0.492, 0.587), status="completed"),
    Trial("t004", beta=0.5, alpha=1.0, temperature=1.0, test_acc=(0.204,), status="diverged"),
)


def log_search(tracking_uri: str) -> str:
    """Log one search the way dkd-tune's tracking does; returns the experiment id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(SEARCH)
    search = client.create_run(
        experiment_id,
        run_name=SEARCH,
        tags={
            "dkd_tune.kind": "search",
            "student": STUDENT,
            "dataset": "synthetic",
            "teacher": TEACHER,
            "teacher_gap": "8.4",
            "predicted_beta": "7.29",
            "dkd_tune.version": "0.1.0",
        },
    )
    search_config = {"search.num_samples": 5, "search.metric": "test_acc", "search.scheduler": "asha"}
    client.log_batch(search.info.run_id, params=[Param(k, str(v)) for k, v in search_config.items()])
    for trial in TRIALS:
        run = client.create_run(
            experiment_id,
            run_name=trial.run_name,
            tags={
                "mlflow.parentRunId": search.info.run_id,
                "dkd_tune.kind": "trial",
                "dkd_tune.trial_id": trial.trial_id,
                "dkd_tune.teacher": TEACHER,
                "dkd_tune.status": trial.status,
            },
        )
        hyperparameters = {
            "beta": trial.beta,
            "alpha": trial.alpha,
            "temperature": trial.temperature,
            "warmup_epochs": 20,
            "lr": 0.05,
            "epochs": 3,
            "batch_size": 64,
            "loss": "dkd",
            "student": STUDENT,
            "teacher": TEACHER,
        }
        metrics = []
        for epoch, accuracy in enumerate(trial.test_acc):
            per_epoch = {
                "test_acc": accuracy,
                "test_acc_top5": min(1.0, accuracy + 0.25),
                "train_acc": accuracy + 0.05,
                "train_loss": 2.5 - 2 * accuracy,
                "train_tckd": 0.1,
                "train_nckd": 0.8 - accuracy,
                "lr": 0.05,
                "best_test_acc": max(trial.test_acc[: epoch + 1]),
                "epoch": epoch,
            }
            metrics += [
                Metric(key, value, 1_700_000_000_000 + epoch, epoch) for key, value in per_epoch.items()
            ]
        client.log_batch(
            run.info.run_id,
            params=[Param(key, str(value)) for key, value in hyperparameters.items()],
            metrics=metrics,
        )
        client.set_terminated(run.info.run_id)
    client.set_terminated(search.info.run_id)
    return experiment_id


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium (Playwright cannot download browsers here); a loud skip if it is missing."""
    if not CHROMIUM.exists():
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
    from playwright.sync_api import expect, sync_playwright

    experiment_id = log_search(mlflow_ui.url)
    expect.set_options(timeout=UI_TIMEOUT_MS)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)

            # The experiment's runs: the search is one row; its trials are nested under it.
            page.goto(f"{mlflow_ui.url}/#/experiments/{experiment_id}/runs")
            runs = page.get_by_role("grid")
            search_row = runs.get_by_role("row").filter(has=page.get_by_role("link", name=SEARCH, exact=True))
            expect(search_row).to_be_visible()
            click_if_shown(page.get_by_role("button", name="Close", exact=True))
            search_row.get_by_role("button").click()  # the row's expand (+) button
            for trial in TRIALS:
                trial_link = page.get_by_role("link", name=trial.run_name, exact=True)
                trial_row = runs.get_by_role("row").filter(has=trial_link)
                trial_row.get_by_role("checkbox").check()
            page.get_by_role("button", name="Compare", exact=True).click()

            # The comparison page: a column per trial.
            expect(
                page.get_by_role("heading", name=f"Comparing {len(TRIALS)} Runs from 1 Experiment")
            ).to_be_visible()
            click_if_shown(page.get_by_role("button", name="Close", exact=True))
            click_if_shown(page.get_by_role("button", name="Toggle sidebar"))
            run_names = [trial.run_name for trial in TRIALS]
            for name in run_names:
                expect(page.get_by_role("row").filter(has_text="Run Name:")).to_contain_text(name)
            columns = table_row(page, "Run Name:")
            assert sorted(columns) == sorted(run_names)
            by_name = {trial.run_name: trial for trial in TRIALS}

            # Parameters: the beta row holds each trial's beta under its own column.
            assert table_row(page, "beta") == [str(by_name[name].beta) for name in columns]
            assert table_row(page, "temperature") == [str(by_name[name].temperature) for name in columns]

            # Metrics (a virtualised grid, not a table): each trial's last test_acc sits on the
            # test_acc row, under that trial's column.
            test_acc_label = page.get_by_role("link", name="test_acc", exact=True)
            expect(test_acc_label).to_be_visible()
            _, row_y = center(test_acc_label.bounding_box())
            for name in columns:
                column = page.get_by_role("cell", name=name, exact=True).bounding_box()
                shown = f"{by_name[name].test_acc[-1]:g}"
                placed = [
                    center(value.bounding_box())
                    for value in page.get_by_role("grid").get_by_text(shown, exact=True).all()
                ]
                assert any(
                    abs(y - row_y) < 10 and column["x"] <= x <= column["x"] + column["width"]
                    for x, y in placed
                ), f"test_acc {shown} of {name} not in its column of the test_acc row (found at {placed})"

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
