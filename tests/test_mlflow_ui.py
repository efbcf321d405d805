"""`dkd-tune ui`: the MLflow server's argument list, the store it shows, bad input, and a real start."""

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dkd_tune.cli import main
from dkd_tune.commands import mlflow_ui
from dkd_tune.core.errors import UserInputError
from tests.listening_sockets import listening_sockets

ROOT = Path(__file__).resolve().parents[1]


def options(command: list[str]) -> dict[str, str]:
    """`--name value` pairs after `python -m mlflow server`, each option given once."""
    pairs = command[4:]
    names = pairs[0::2]
    assert all(name.startswith("--") for name in names) and len(set(names)) == len(names)
    return dict(zip(names, pairs[1::2], strict=True))


@pytest.fixture
def exec_calls(monkeypatch):
    """Record what `run_ui` would exec instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(mlflow_ui.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    return calls


def test_command_runs_mlflow_server_on_localhost_by_default():
    command = mlflow_ui.ui_command("sqlite:////data/mlflow.db")
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert options(command) == {
        "--backend-store-uri": "sqlite:////data/mlflow.db",
        "--host": "127.0.0.1",
        "--port": "5000",
        "--workers": "1",
    }


def test_run_ui_execs_the_argument_list_itself_not_a_shell(exec_calls, monkeypatch):
    monkeypatch.delenv(mlflow_ui.JOB_EXECUTION_VARIABLE, raising=False)
    # Characters a shell would act on must reach MLflow as one unchanged argument.
    store_uri = "sqlite:////tmp/my runs/mlflow.db; touch $HOME/pwned"
    mlflow_ui.run_ui(store_uri, port=5123)
    [(path, argv, env)] = exec_calls
    assert path == sys.executable and argv == mlflow_ui.ui_command(store_uri, "127.0.0.1", 5123)
    assert argv[argv.index("--backend-store-uri") + 1] == store_uri
    assert env[mlflow_ui.JOB_EXECUTION_VARIABLE] == "false"


def test_run_ui_prints_each_experiments_model_training_link(exec_calls, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.mlflow_store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

    store_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store_uri)
    identifier = open_store(store_uri).experiment("demo")
    assert client.get_experiment(identifier).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    mlflow_ui.run_ui(store_uri, port=5123)
    printed = capsys.readouterr().out
    assert (
        f"demo: http://127.0.0.1:5123/#/experiments/{identifier}/runs?workflowType=machine_learning"
        in printed
    )
    # A store that does not exist yet is left for the server to create.
    mlflow_ui.run_ui(f"sqlite:///{tmp_path / 'none.db'}", port=5123)
    assert not (tmp_path / "none.db").exists()


def test_a_search_gets_a_view_of_its_trials_sorted_by_its_metric(exec_calls, tmp_path, capsys):
    """MLflow's URL cannot choose the runs table's columns; a shared view (an experiment tag) can, and
    `dkd-tune ui` links each search's."""
    import json

    from mlflow.tracking import MlflowClient

    from dkd_tune.config.loading import load_search_space
    from dkd_tune.search.parent_run import save_search_view
    from dkd_tune.tracking.connect import open_store
    from dkd_tune.tracking.runs_view import SHARED_VIEW_TAG_PREFIX, TAG_VIEW

    store_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store_uri)
    store = open_store(store_uri)
    space = load_search_space(ROOT / "search_spaces" / "demo.yaml")
    identifier = store.experiment(space.name)
    search = client.create_run(identifier, run_name="demo-1")
    trials = [
        client.create_run(identifier, run_name=f"t{i}", tags={"mlflow.parentRunId": search.info.run_id})
        for i in range(3)
    ]
    for trial, val_acc in zip(trials, [40.0, 60.0, 50.0], strict=True):
        client.log_metric(trial.info.run_id, "val_acc", val_acc)
    client.create_run(identifier, run_name="other search's trial", tags={"mlflow.parentRunId": "x"})
    save_search_view(store, identifier, search.info.run_id, space)

    key = client.get_run(search.info.run_id).data.tags[TAG_VIEW]
    state = json.loads(client.get_experiment(identifier).tags[SHARED_VIEW_TAG_PREFIX + key])
    assert state["selectedColumns"] == [
        "params.`loss`", "params.`beta`", "params.`alpha`", "params.`temperature`",
        "metrics.`val_acc`", "metrics.`test_acc`",
    ]  # fmt: skip
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_acc`", False)
    # The view's filter and sort, as the UI sends them to the server: this search's trials, best first.
    shown = client.search_runs(
        [identifier], filter_string=state["searchFilter"], order_by=["metrics.`val_acc` DESC"]
    )
    assert [run.info.run_name for run in shown] == ["t1", "t2", "t0"]

    mlflow_ui.run_ui(store_uri, port=5123)
    printed = capsys.readouterr().out
    assert (
        f"search demo-1, its trials best first: http://127.0.0.1:5123/#/experiments/{identifier}/runs"
        f"?viewStateShareKey={key}&workflowType=machine_learning"
    ) in printed


def test_user_setting_for_server_jobs_is_kept():
    environ = {"PATH": "/usr/bin", mlflow_ui.JOB_EXECUTION_VARIABLE: "true"}
    assert mlflow_ui.ui_environment(environ) == environ


def test_cli_passes_host_port_and_store_through(exec_calls, capsys):
    main(["ui", "--tracking-uri", "sqlite:////data/a.db", "--port", "5123", "--host", "0.0.0.0"])
    main(["ui", "--tracking-uri", "sqlite:////data/a.db"])
    (_, chosen, _), (_, default, _) = exec_calls
    assert options(chosen) == {
        "--backend-store-uri": "sqlite:////data/a.db",
        "--host": "0.0.0.0",
        "--port": "5123",
        "--workers": "1",
    }
    assert options(default)["--host"] == "127.0.0.1" and options(default)["--port"] == "5000"
    assert "http://0.0.0.0:5123" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad_option",
    [
        ["--host", "-x"],
        ["--host", ""],
        ["--port", "0"],
        ["--port", "70000"],
        ["--tracking-uri", "http://tracking.example:5000"],
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(bad_option, exec_calls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ui", "--tracking-uri", "sqlite:////data/a.db", *bad_option])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert exec_calls == []


def test_http_tracking_uri_is_refused_with_a_pointer_to_its_own_ui():
    with pytest.raises(UserInputError, match=r"tracking.example:5000 .* open http://tracking.example:5000"):
        mlflow_ui.resolve_store_uri("http://tracking.example:5000")


def resolve_in_subprocess(cwd: Path, tracking_uri_env: str | None) -> subprocess.CompletedProcess:
    """resolve_store_uri() in a fresh Python, so no MLflow state of this process leaks in."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    if tracking_uri_env is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri_env
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from dkd_tune.commands.mlflow_ui import resolve_store_uri; print(resolve_store_uri())",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_store_is_the_environment_variable_else_mlflow_db_in_the_working_directory(tmp_path):
    default = resolve_in_subprocess(tmp_path, None)
    assert default.returncode == 0, default.stderr
    assert default.stdout.strip() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    from_env = resolve_in_subprocess(tmp_path, "sqlite:////shared/team.db")
    assert from_env.stdout.strip() == "sqlite:////shared/team.db"
    assert mlflow_ui.resolve_store_uri("sqlite:////given.db") == "sqlite:////given.db"


def test_http_tracking_uri_from_the_environment_exits_2(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = "http://tracking.example:5000"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "dkd_tune", "ui"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dkd-tune: error: MLFLOW_TRACKING_URI http://tracking.example:5000 is an MLflow tracking server,"
        " which has its own UI: open http://tracking.example:5000 in a browser"
    ]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_ui_serves_the_given_store_on_localhost_and_stops(mlflow_ui, tmp_path):
    with urllib.request.urlopen(mlflow_ui.url + "/", timeout=30) as response:
        assert response.status == 200
        assert b"MLflow" in response.read()
    # The server created its tables in the store it was given, and listens on loopback only.
    assert (tmp_path / "mlflow.db").stat().st_size > 0
    assert f"Uvicorn running on http://127.0.0.1:{mlflow_ui.port}" in mlflow_ui.log_path.read_text()
    sockets = listening_sockets(mlflow_ui.process.pid)
    assert any(s.port == mlflow_ui.port for s in sockets), sockets
    assert all(s.loopback_only for s in sockets), sockets
    mlflow_ui.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", mlflow_ui.port), timeout=5):
        pass
