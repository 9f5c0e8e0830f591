"""A finished run in MLflow (`tracking.mlflow: true`), logged when `llamaduo run` ends.

One MLflow run per run folder, named after it: the params (flattened, dotted), tags (run folder, service LLM, code),
the verdict of every (task, local model) as a tag and the chosen volume as a metric, `metrics.csv`,
`report/verdicts.csv`, the report's figures and report.html as artifacts. Under it a child run per cell
(task, local model, volume, cycle), tagged with the cell, holding its metrics.csv values (similarity / precision:
mean, median, coverage@ζ and their interval bounds) and, for an adapter, its training curve (`train_loss` by
optimizer step, from the adapter's train_log.csv).

A rerun updates the same MLflow run (its id is kept in `<run>/tracking.json`; a store that lost it is searched by
the run folder's tag), and logs nothing when nothing it logs changed. Changed params (a rerun with --force) start a
new MLflow run: MLflow refuses to change a logged param, and the old run stays as the record of the old params.
Only mlflow's client is used, so the store is anything MLflow reaches: a local SQLite file by default, a tracking
server, Databricks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import file_fingerprint, fingerprint, read_json, write_json
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.rows import SERVICE_VOLUME, is_service
from llamaduo_nb.core.units import stage_dir, without_operational
from llamaduo_nb.stages import evaluate, report
from llamaduo_nb.methods import verdict

TRACKING_JSON = "tracking.json"  # the MLflow run this folder was logged to, and what was logged
TAG = "llamaduo"  # prefix of the workbench's own tags
MAX_PARAM = 6000  # MLflow's limit on a param value's length
BATCH = 100  # MLflow's limit on params per log_batch call
METRIC_NAME = re.compile(r"[^\w.\- /]")  # characters MLflow refuses in a metric or param key


def default_uri(run_dir: Path) -> str:
    """A SQLite store beside the run folders: every run of a results folder in one MLflow UI (`mlflow ui
    --backend-store-uri sqlite:///results/mlflow.db`)."""
    return f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}"


def flat_params(params: Params) -> dict[str, str]:
    """Dotted keys → string values, as MLflow keeps params; the operational settings are left out (they change
    no output, and MLflow would refuse their new values on the same run)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            text = node if isinstance(node, str) else json.dumps(node, ensure_ascii=False)
            out[METRIC_NAME.sub("_", prefix)] = text[:MAX_PARAM]

    walk("", without_operational(params.dump()))
    return out


def cell_name(row) -> str:
    volume = int(row["volume"])
    if volume == SERVICE_VOLUME or is_service(pd.Series([row["local_model"]])).iloc[0]:
        return f"{row['task']} · {row['local_model']}"
    what = "base model" if volume == 0 else f"{volume} samples"
    return f"{row['task']} · {row['local_model']} · {what}" + (f" · cycle {int(row['cycle'])}" if int(row["cycle"]) > 1 else "")


def cell_metrics(group: pd.DataFrame, several_judges: bool) -> dict[str, float]:
    """One cell's metrics.csv rows → {similarity_mean: …, precision_coverage_50_ci_low: …}; a judge prefix only
    when the run has several judges."""
    values = {}
    skip = {"task", "local_model", "judge", "volume", "cycle", "metric"}
    for _, row in group.iterrows():
        prefix = (f"{row['judge']}/" if several_judges else "") + f"{row['metric']}_"
        for column, value in row.items():
            if column in skip:
                continue
            number = pd.to_numeric(value, errors="coerce")
            if pd.notna(number) and math.isfinite(float(number)):
                values[METRIC_NAME.sub("_", prefix + str(column))] = float(number)
    return values


def training_curves(run_dir: Path) -> dict[tuple, pd.DataFrame]:
    """(cycle, task, local model, volume) → that adapter's training log (every cycle's, as the report reads them)."""
    logs = report.load_train_logs(run_dir)
    if logs.empty:
        return {}
    return {(int(cycle), task, model, int(volume)): log
            for (cycle, task, model, volume), log in logs.groupby(["cycle", "task", "local_model", "volume"])}


def artifacts(run_dir: Path) -> list[tuple[Path, str]]:
    """(file, folder in the MLflow run) for what a reader of the run looks at."""
    out = [(run_dir / name, "") for name in ("metrics.csv", "pairwise.csv", "report.html", "params.yaml")]
    folder = stage_dir(run_dir, "report")
    out += [(path, "report") for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.csv"))]
    return [(path, where) for path, where in out if path.exists()]


def log_run(params: Params, run_dir: Path | str, log=print) -> str | None:
    """Log the run folder to MLflow; returns the MLflow run id (None when nothing could be logged yet)."""
    run_dir = Path(run_dir)
    metrics = report.load_metrics(run_dir) if (run_dir / "metrics.csv").exists() else pd.DataFrame()
    uri = params.tracking.mlflow_uri or default_uri(run_dir)
    try:
        return _log(params, run_dir, metrics, uri, log)
    except UserError:
        raise
    except Exception as exc:  # the store is unreachable, refuses a value, …: the run's own outputs are complete
        raise UserError(f"tracking.mlflow: the run finished, but logging it to {uri} failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); run the same command again to log it "
                        f"(nothing else is redone)") from None


def _log(params: Params, run_dir: Path, metrics: pd.DataFrame, uri: str, log) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = params.tracking.experiment or params.run_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (run_dir.parent.resolve() / "mlartifacts" / name).as_uri() if uri.startswith("sqlite:") else None
        # the UI opens a "model training" experiment on its runs (MLflow 3 would show a GenAI traces page)
        experiment_id = client.create_experiment(name, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
    else:
        experiment_id = experiment.experiment_id
    params_fingerprint = fingerprint(flat_params(params))
    record_path = run_dir / TRACKING_JSON
    record = read_json(record_path) if record_path.exists() else {}
    run_id = record.get("run_id") if record.get("uri") == uri and record.get("params") == params_fingerprint else None
    if run_id:
        try:
            if client.get_run(run_id).info.lifecycle_stage != "active":
                run_id = None
        except MlflowException:
            run_id = None  # the store no longer has it
    if run_id is None:  # changed params start a new MLflow run: the old one keeps the old params
        found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}.run_folder` = '{run_dir.resolve()}' "
                                   f"and tags.`{TAG}.params_fingerprint` = '{params_fingerprint}'", max_results=1)
        run_id = found[0].info.run_id if found else None
    if run_id != record.get("run_id"):
        record = {}  # nothing of this MLflow run is known to be logged
    logged = record.get("logged", {})  # what was logged, by fingerprint: only what changed is logged again
    now = int(pd.Timestamp.now().timestamp() * 1000)

    tags = {f"{TAG}.run_folder": str(run_dir.resolve()), f"{TAG}.params_fingerprint": params_fingerprint,
            f"{TAG}.service_llm": params.service.label, "mlflow.runName": run_dir.name}
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").exists() else {}
    if manifest.get("git_commit"):
        tags["mlflow.source.git.commit"] = manifest["git_commit"]
    verdicts = report.load_verdicts(run_dir)
    chosen = {}
    if not verdicts.empty:
        rule = evaluate.verdict_rule(params)
        for _, row in verdict.summary(verdicts).iterrows():
            key = METRIC_NAME.sub("_", f"{row['task']}/{row['local_model']}")
            tags[f"verdict.{key}"] = verdict.sentence(row, rule)[:5000]
            if row["found"]:
                chosen[f"chosen_volume/{key}"] = float(row["volume"])
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        items = [Param(k, v) for k, v in flat_params(params).items()]
        for start in range(0, len(items), BATCH):
            client.log_batch(run_id, params=items[start:start + BATCH])
    updates = {}
    summary = fingerprint({"tags": tags, "chosen": chosen})
    if logged.get("summary") != summary:
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in chosen.items()], tags=[RunTag(k, v) for k, v in tags.items()])
        updates["summary"] = summary
    for path, where in artifacts(run_dir):
        key = f"file:{path.relative_to(run_dir)}"
        content = file_fingerprint(path)
        if logged.get(key) != content:
            client.log_artifact(run_id, str(path), artifact_path=where or None)
            updates[key] = content

    children = {r.data.tags.get(f"{TAG}.cell"): r.info.run_id for r in client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000)}
    curves = training_curves(run_dir)
    several_judges = metrics["judge"].nunique() > 1 if not metrics.empty else False
    cells = metrics.groupby(["cycle", "task", "local_model", "volume"], sort=True) if not metrics.empty else []
    for (cycle, task, model, volume), group in cells:
        row = {"cycle": cycle, "task": task, "local_model": model, "volume": volume}
        cell = f"{task}/{model}/{int(volume)}" + (f"@{int(cycle)}" if int(cycle) > 1 else "")
        values = cell_metrics(group, several_judges)
        curve = curves.get((int(cycle), task, model, int(volume)))
        points = [] if curve is None else [(int(r["step"]), float(r["loss"])) for _, r in curve.iterrows() if pd.notna(r["loss"])]
        content = fingerprint({"values": values, "curve": points})
        if cell in children and logged.get(f"cell:{cell}") == content:
            continue
        cell_tags = {f"{TAG}.cell": cell, "task": task, "local_model": model, "volume": str(int(volume)),
                     "cycle": str(int(cycle)), "mlflow.parentRunId": run_id, "mlflow.runName": cell_name(row)}
        child = children.get(cell)
        if child is None:
            child = client.create_run(experiment_id, run_name=cell_name(row), tags=cell_tags).info.run_id
        batch = [Metric(k, v, now, 0) for k, v in values.items()] + [Metric("train_loss", loss, now, step) for step, loss in points]
        for start in range(0, max(1, len(batch)), 1000):  # MLflow's limit on metrics per batch
            client.log_batch(child, metrics=batch[start:start + 1000], tags=[RunTag(k, v) for k, v in cell_tags.items()] if start == 0 else [])
        client.set_terminated(child)
        updates[f"cell:{cell}"] = content
    if not updates:
        log(f"[tracking] MLflow run {run_id} at {uri} is up to date")
        return run_id
    client.set_terminated(run_id)
    write_json(record_path, {"uri": uri, "experiment": name, "run_id": run_id, "params": params_fingerprint,
                             "logged": dict(logged, **updates)})
    cells_logged = sum(key.startswith("cell:") for key in updates)
    log(f"[tracking] MLflow run {run_id} at {uri}, experiment '{name}': {cells_logged} cells, "
        f"{sum(key.startswith('file:') for key in updates)} files logged")
    return run_id
