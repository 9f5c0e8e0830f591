"""Trackers, against the real ones: a tiny run logged to a real `mlflow server` (started here on a free port) and
read back with MlflowClient; its training curves written for TensorBoard and read back with TensorBoard's own
event reader; a rerun updates the same MLflow run; the default store is a SQLite file beside the run folders.

Outside `make test` (MLflow and TensorBoard are an optional extra): `make test-trackers`, run by CI.
"""

import os
import socket
import subprocess
import sys
import time

import urllib.error
import urllib.request

import pytest

from tests.test_workbench import TINY, llamaduo

pytestmark = [pytest.mark.trackers, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("LLAMADUO_TRACKERS") != "1", reason="make test-trackers runs the trackers' tier")]

TRACKED = TINY.replace("deploy: {enabled: true, parity: false}  # exports only: the parity check runs in make test-real-server\n", "") + """\
tracking: {mlflow: true, mlflow_uri: "URI", report_to: [tensorboard]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                               "--workers", "1"], stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracked")
    params = folder / "tracked.yaml"
    params.write_text(TRACKED.replace("URI", mlflow_server))
    run_dir = folder / "results" / "tiny"
    proc = llamaduo("run", str(params), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return params, run_dir, proc


def runs_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_the_run_is_in_the_mlflow_server_with_params_cells_curves_and_figures(tracked_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, run_dir, proc = tracked_run
    client = MlflowClient(tracking_uri=mlflow_server)
    parents, children = runs_of(client, "tiny")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert parent.data.params["finetune.volumes"] == "[2, 4]" and parent.data.params["infer.k"] == "2"
    assert not any(key.startswith("tracking.") or key.startswith("execution.") for key in parent.data.params)  # operational, left out
    assert any(key.startswith("verdict.closed_qa") for key in parent.data.tags)
    assert parent.data.tags["llamaduo.run_folder"] == str(run_dir.resolve())
    # a child run per cell: the base model, volumes 2 and 4, the service LLM's own answers
    cells = {c.data.tags["llamaduo.cell"]: c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    assert set(cells) == {"closed_qa/smollm2-135m-instruct/0", "closed_qa/smollm2-135m-instruct/2", "closed_qa/smollm2-135m-instruct/4",
                          "closed_qa/service:local:smollm2-135m-instruct/-1"}, set(cells)
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    four = metrics[(metrics["volume"] == 4) & (metrics["metric"] == "precision")].iloc[0]
    logged = cells["closed_qa/smollm2-135m-instruct/4"]
    assert logged.data.metrics["precision_mean"] == pytest.approx(four["mean"])
    assert logged.data.tags["task"] == "closed_qa" and logged.data.tags["volume"] == "4"
    curve = client.get_metric_history(logged.info.run_id, "train_loss")
    train_log = pd.read_csv(run_dir / "finetune" / "closed_qa" / "smollm2-135m-instruct" / "4" / "train_log.csv")
    assert [(m.step, round(m.value, 6)) for m in curve] == [(int(s), round(float(v), 6)) for s, v in zip(train_log["step"], train_log["loss"])]
    assert "train_loss" not in cells["closed_qa/smollm2-135m-instruct/0"].data.metrics  # the base model is not trained
    files = {a.path for a in client.list_artifacts(parent.info.run_id)} | {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"metrics.csv", "report.html", "params.yaml", "report/verdict_by_volume.png", "report/precision_vs_volume.png"} <= files, files
    assert "[tracking] MLflow run" in proc.stdout


def test_a_rerun_updates_the_same_mlflow_run(tracked_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    params, run_dir, _ = tracked_run
    client = MlflowClient(tracking_uri=mlflow_server)
    before = runs_of(client, "tiny")
    again = llamaduo("run", str(params), "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date" in again.stdout
    after = runs_of(client, "tiny")
    assert [r.info.run_id for r in after[0]] == [r.info.run_id for r in before[0]]
    assert sorted(r.info.run_id for r in after[1]) == sorted(r.info.run_id for r in before[1])
    logged = next(c for c in after[1] if c.data.tags["llamaduo.cell"].endswith("/4"))
    assert len(client.get_metric_history(logged.info.run_id, "precision_mean")) == 1  # nothing logged twice


def test_tensorboard_finds_the_training_curves(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = tracked_run
    for volume in (2, 4):
        folder = run_dir / "tensorboard" / "closed_qa" / "smollm2-135m-instruct" / str(volume)
        assert list(folder.glob("events.out.tfevents.*")), folder
        events = EventAccumulator(str(folder))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"], events.Tags()
        assert len(events.Scalars("train/loss")) >= 1
    # the event files are logs beside the adapters, never inside them (an adapter's content is its fingerprint)
    assert not list((run_dir / "finetune").rglob("events.out.tfevents.*"))


def test_the_default_store_is_a_sqlite_file_beside_the_run_folders(tracked_run):
    from mlflow.tracking import MlflowClient

    from llamaduo_nb.core.params_file import load_params
    from llamaduo_nb.pipeline import tracking

    params_file, run_dir, _ = tracked_run
    params = load_params(params_file)
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"mlflow_uri": None, "experiment": "local"})})
    lines = []
    run_id = tracking.log_run(params, run_dir, lines.append)
    store = run_dir.parent / "mlflow.db"
    assert store.exists() and tracking.default_uri(run_dir) == f"sqlite:///{store.resolve()}"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    parents, children = runs_of(client, "local")
    assert [p.info.run_id for p in parents] == [run_id] and len(children) == 4
    assert (run_dir.parent / "mlartifacts" / "local").exists()
    # the MLflow UI of that store needs no server: `mlflow ui --backend-store-uri sqlite:///…/mlflow.db`
    assert tracking.log_run(params, run_dir, lines.append) == run_id and "up to date" in lines[-1]
