"""Stage 8 · report: the paper's figures, the metrics table, report.html.

Reads: `metrics.csv` (at the run folder's top, every cycle), each cycle's judgements, `deduplicate/funnel.csv`,
`finetune/` training logs and `manifest.json`, `evaluate/human_labels/`, and `cycles.json` when the run
cycled. Writes `report/*.png` and `report/*.svg` (the figures of `figures.py`), `report/metrics_table.csv`,
`report/verdicts.csv` (every volume's verdict against the target, and its place in the fixed sequence:
`methods/verdict.py`), `report/noise.csv` (where each verdict's variance comes from: `methods/planning.py`),
DONE.json; the runner exports the executed notebook as `report.html`.

One unit: the figure set, made from the content of every cycle's evaluation, `cycles.json`, the
zetas and the cycle target. Everything it shows comes from the current grid (the earlier stages
report only current cells).

Cycles: cycle 1 is the run folder itself, cycle t ≥ 2 is `<run>/cycle-<t>/`. metrics.csv holds
the rows of every cycle (column `cycle`); a cycle ≥ 2 trains one adapter per (task, local model)
on everything kept so far, so its volume is the pool size. The base model (volume 0) is
answered again in every cycle; the figures and the table show it once (its first cycle).
"""

from __future__ import annotations

import graphlib
import os
import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import yaml

from llamaduo_nb.stages.evaluate import people
from llamaduo_nb.figures import (base_once, cost_per_stage, coverage_bars, funnel_plot, judge_vs_human, loss_curves,
                                 score_across_cycles, score_vs_volume, served_vs_adapter, verdict_by_volume)
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_json, save_figure, write_csv, write_text
from llamaduo_nb.methods import planning, verdict
from llamaduo_nb.core.rows import is_service, with_cycle
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import (CYCLES_JSON, SEARCH_JSON, Stage, StageResult, StageRun, cycle_folders, later_cycles, optional_file,
                                    read_done, root_of, stage_dir)
from llamaduo_nb.stages import deploy, evaluate, finetune

NOT_THE_PAPER = (
    "Offline stand-in: the judge is the local model itself, scoring by likelihood. "
    "These numbers show the pipeline works; they are not the paper's numbers."
)


# -- reading a run (every cycle) -------------------------------------------------------------------


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """metrics.csv of the run (the top folder's, which holds every cycle), with a `cycle` column."""
    return with_cycle(evaluate.load_metrics(root_of(run_dir)))



VERDICTS_CSV = "verdicts.csv"
NOISE_CSV = "noise.csv"


def load_verdicts(run_dir: Path | str) -> pd.DataFrame:
    """report/verdicts.csv: every cell's verdict and its place in the fixed sequence (empty before the report ran)."""
    path = stage_dir(root_of(run_dir), "report") / VERDICTS_CSV
    return pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame()


def noise_table(params: Params, run_dir: Path | str) -> pd.DataFrame:
    """Per cell: where the variance of its verdict comes from (prompts, K answers, M judgements) and the interval's
    half-width with twice each (`methods/planning.py`), on the score scale of the target's metric."""
    rule = evaluate.verdict_rule(params)
    judgements = evaluate.load_all_judgements(run_dir)
    if judgements.empty:
        return pd.DataFrame()
    judge = rule.judge or params.judges[0].label
    data = judgements[(judgements["judge"] == judge)].copy()
    data["value"] = pd.to_numeric(data[rule.metric], errors="coerce").where(data["valid"].fillna(False).astype(bool))
    service_mask = is_service(data["local_model"]).to_numpy()
    service, local = data[service_mask], data[~service_mask]
    rows = []
    for (task, model, cycle, volume), cell in local.groupby(["task", "local_model", "cycle", "volume"], sort=True):
        if volume == 0 and cycle != local[(local["task"] == task) & (local["volume"] == 0)]["cycle"].min():
            continue  # the base model once, in its first cycle (as the verdict)
        other = service[service["task"] == task]
        other = other[other["cycle"] == other["cycle"].min()] if len(other) else other
        parts = planning.paired_components(cell[["prompt_id", "k", "value"]],
                                           other[["prompt_id", "k", "value"]] if rule.versus_service else None, rule.test_alpha)
        rows.append({"task": task, "local_model": model, "cycle": int(cycle), "volume": int(volume), **parts,
                     "advice": planning.advice(parts)})
    return pd.DataFrame(rows)


def planner_lines(params: Params, verdicts: pd.DataFrame) -> list[str]:
    """The planner per task, from the spread of the task's decided cells (the pilot), else the stated default."""
    rule = evaluate.verdict_rule(params)
    if verdicts.empty:
        return [planning.planner_line(rule, None, None, "")]
    lines = []
    for task, rows in verdicts.groupby("task", sort=True):
        sd = planning.pooled_sd(rows["sd"])
        n = int(rows["prompts"].max()) if len(rows) else None
        lines.append(f"{task}: " + planning.planner_line(rule, sd, n, f"this run's {int(rows['sd'].gt(0).sum())} decided cells"))
    return lines


def headline(params: Params, run_dir: Path | str) -> list[str]:
    """The report's first lines: the rule, per (task, local model) the verdict's sentence, and the planner."""
    table = load_verdicts(run_dir)
    rule = evaluate.verdict_rule(params)
    if table.empty:
        return [verdict.rule_line(rule), "No verdict yet: the report has not read any judged answers."]
    lines = [verdict.rule_line(rule)]
    lines += [verdict.sentence(r, rule, params.service.label) for r in verdict.summary(table).to_dict("records")]
    lines += provenance_lines(run_dir)
    if params.finetune.search:
        search = root_of(run_dir) / SEARCH_JSON
        lines += ["Volume search: " + line for line in (read_json(search).get("summary", []) if search.exists() else [])]
    return lines + planner_lines(params, table)


def provenance_lines(run_dir: Path | str) -> list[str]:
    """What a reader must know of how the numbers were made: volumes short of their label, and outputs made by
    different versions of the code (each stage records the code that made it)."""
    lines, codes = [], {}
    for cycle, folder in cycle_folders(run_dir):
        path = Path(folder) / "manifest.json"
        for stage, record in ((read_json(path).get("stages") or {}) if path.exists() else {}).items():
            code = record.get("code") or {}
            version = (code.get("versions") or {}).get("llamaduo-nb")
            key = f"{version} ({(code.get('git_commit') or 'no git')[:10]}{', with local changes' if code.get('dirty') else ''})"
            codes.setdefault(key, []).append(stage if cycle == 1 else f"cycle {cycle} {stage}")
            lines += [f"Warning: {w}" for w in record.get("warnings") or [] if stage == "finetune"]
    if len(codes) > 1:
        lines.append("Made by more than one version of the code: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in codes.items()))
    return lines


VERDICT_VIEW = ["task", "local_model", "volume", "cycle", "outcome", "sequence", "chosen", "estimate", "low", "high", "bound",
                "prompts", "failed_local", "failed_service", "outcome_if_dropped", "p_value"]
NOISE_VIEW = ["task", "local_model", "volume", "cycle", "share_prompt", "share_answer", "share_judgement", "half_width",
              "half_width_2n", "half_width_2k", "half_width_2m", "advice"]


def verdict_view(verdicts: pd.DataFrame) -> pd.DataFrame:
    """verdicts.csv for reading: the deciding columns, rounded (the CSV keeps full precision)."""
    return verdicts[[c for c in VERDICT_VIEW if c in verdicts.columns]].round(2)


def noise_view(run_dir: Path | str) -> pd.DataFrame:
    """noise.csv for reading: the shares of the variance and the half-widths, rounded."""
    path = stage_dir(root_of(run_dir), "report") / NOISE_CSV
    frame = pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame()
    return frame[[c for c in NOISE_VIEW if c in frame.columns]].round(2) if len(frame) else frame


def load_cycles(run_dir: Path | str) -> dict | None:
    """`<run>/cycles.json` (written by the runner when it cycles), or None."""
    path = root_of(run_dir) / CYCLES_JSON
    return read_json(path) if path.exists() else None


def cycles_table(cycles: dict | None) -> pd.DataFrame:
    """cycles.json as a table: one row per (cycle, task, local model, judge) score checked against the target."""
    cols = ["cycle", "task", "local_model", "judge", "volume", "value", "met", "cycle_met", "new_pairs", "kept_pairs_total", "cost_usd"]
    rows = []
    for c in (cycles or {}).get("cycles", []):
        new, kept = c.get("new_pairs") or {}, c.get("kept_pairs_total") or {}
        for s in c.get("scores") or [{}]:
            task = s.get("task")
            rows.append({"cycle": c.get("cycle"), "task": task, "local_model": s.get("local_model"), "judge": s.get("judge"),
                         "volume": s.get("volume"), "value": s.get("estimate", s.get("value")),  # the verdict's, or an older run's
                         "met": s.get("passed", s.get("met")), "cycle_met": c.get("met"),
                         "new_pairs": new.get(task) if task else sum(new.values()),
                         "kept_pairs_total": kept.get(task) if task else sum(kept.values()), "cost_usd": c.get("cost_usd")})
    return pd.DataFrame(rows, columns=cols)


def load_funnels(run_dir: Path | str) -> pd.DataFrame:
    """Every cycle's deduplicate/funnel.csv, with a `cycle` column."""
    frames = []
    for cycle, folder in cycle_folders(run_dir):
        path = stage_dir(folder, "deduplicate") / "funnel.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(cycle=cycle))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_train_logs(run_dir: Path | str) -> pd.DataFrame:
    """Every cycle's training logs, with a `cycle` column."""
    frames = []
    for cycle, folder in cycle_folders(run_dir):
        if stage_dir(folder, "finetune").exists():
            logs = finetune.load_train_logs(folder)
            if not logs.empty:
                frames.append(logs.assign(cycle=cycle))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


LLM_KEYS = ("requests", "cache_hits", "api_calls", "input_tokens", "output_tokens", "cost_usd")


def stage_costs(run_dir: Path | str) -> pd.DataFrame:
    """One row per (cycle, stage) from every cycle's manifest.json: wall time and the service-LLM
    accounting summed over services (judges included)."""
    cols = ["cycle", "stage", "seconds", *LLM_KEYS]
    rows = []
    inputs: dict = {}  # stage -> the stages it read: the order of the stages, as each recorded it
    for cycle, folder in cycle_folders(run_dir):
        path = Path(folder) / "manifest.json"
        if not path.exists():
            continue
        for stage, record in (read_json(path).get("stages") or {}).items():
            inputs.setdefault(stage, set()).update(record.get("inputs") or ())
            row = {"cycle": cycle, "stage": stage, "seconds": float(record.get("seconds") or 0.0)}
            for key in LLM_KEYS:
                row[key] = sum(float((acc or {}).get(key) or 0) for acc in (record.get("llm") or {}).values())
            rows.append(row)
    frame = pd.DataFrame(rows, columns=cols)
    order = {s: i for i, s in enumerate(graphlib.TopologicalSorter(inputs).static_order())}
    return frame.sort_values(["cycle", "stage"], key=lambda s: s.map(order).fillna(len(order)) if s.name == "stage" else s,
                             kind="stable").reset_index(drop=True)


def _reads(params: Params, run_dir: Path) -> dict:
    # the report covers every cycle, and the cycle loop's record
    return {"cycles": later_cycles(run_dir, "evaluate"), "cycles.json": optional_file(root_of(run_dir) / CYCLES_JSON),
            "search.json": optional_file(root_of(run_dir) / SEARCH_JSON)}


# the search splits α over its looks, so the grid and the cycles count too
STAGE = Stage("report", upstream=("deduplicate", "finetune", "infer", "evaluate"), optional_upstream=("deploy",), reads=_reads,
              depends_on=("evaluate.zetas", "cycle.target", "cycle.alpha", "infer.k", "evaluate.m", "finetune.search", "finetune.volumes",
                          "cycle.max_cycles"))
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    stage.begin()
    out = stage_dir(run_dir, "report")
    metrics = load_metrics(run_dir)
    zetas = params.evaluate.zetas
    written = []
    for metric in ("similarity", "precision"):
        written += save_figure(score_vs_volume(metrics, metric), out / f"{metric}_vs_volume")
        written += save_figure(coverage_bars(metrics, metric, zetas), out / f"{metric}_coverage")
    cycles = load_cycles(run_dir)
    verdicts = evaluate.run_verdicts(params, run_dir)
    rule = evaluate.verdict_rule(params)
    grid = params.finetune.volumes if params.finetune.search else None  # the search: the grid's volumes it did not train
    written += save_figure(verdict_by_volume(verdicts, rule, grid=grid), out / "verdict_by_volume")
    written += save_figure(score_across_cycles(verdicts, rule, stop_reason=(cycles or {}).get("stop_short") or (cycles or {}).get("stop_reason")), out / "score_across_cycles")
    written += save_figure(cost_per_stage(stage_costs(root_of(run_dir))), out / "cost_per_stage")
    funnels = load_funnels(run_dir)
    if not funnels.empty:
        written += save_figure(funnel_plot(funnels), out / "dedup_funnel")
    logs = load_train_logs(run_dir)
    if not logs.empty:
        written += save_figure(loss_curves(logs), out / "training_loss")
    human = people.load_human_check(root_of(run_dir))
    if not human["items"].empty:
        written += save_figure(judge_vs_human(human["items"], human["agreement"]), out / "judge_vs_human")
    parity = deploy.load_parity(root_of(run_dir))
    if not parity.empty:
        written += save_figure(served_vs_adapter(parity), out / "served_vs_adapter")
    plt.close("all")
    write_csv(out / "metrics_table.csv", metrics_table(metrics, zetas))
    write_csv(out / VERDICTS_CSV, verdicts)
    write_csv(out / NOISE_CSV, noise_table(params, run_dir))
    for old in set(out.glob("*.png")) | set(out.glob("*.svg")):
        if old not in written:  # a figure this run no longer draws (e.g. no funnel) must not linger beside the new ones
            old.unlink()
    outputs = ["metrics_table.csv", VERDICTS_CSV, NOISE_CSV] + [p.name for p in written]
    found = verdict.summary(verdicts) if len(verdicts) else verdicts
    return stage.finish({"figures": len(written) // 2, "verdicts_passed": int(found["found"].sum()) if len(found) else 0},
                        outputs=outputs)


def metrics_table(metrics: pd.DataFrame, zetas=(50, 70)) -> pd.DataFrame:
    """The paper's table: one row per (cycle, task, model, judge, volume), similarity and precision side
    by side (the base model and the service LLM once, in their first cycle; the service LLM's volume is -1)."""
    cols = ["mean", "median"] + [f"coverage_{z}" for z in zetas]
    index = ["cycle", "task", "local_model", "judge", "volume"]
    wide = base_once(metrics).pivot_table(index=index, columns="metric", values=cols)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    ordered = [f"{m}_{c}" for m in ("similarity", "precision") for c in cols if f"{m}_{c}" in wide.columns]
    return wide[ordered].round(1).reset_index()


def compare_runs(run_dirs: list[Path | str], out_dir: Path | str) -> list[Path]:
    """Overlay several runs: one line per (run, local model, judge) in the score-vs-volume figures."""
    frames = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        names = metrics["local_model"].astype(str)
        service = is_service(names).to_numpy()  # the service LLM stays recognisable: service:<run>: <label>
        renamed = names.where(service, Path(run_dir).name + ": " + names)
        renamed = renamed.where(~service, "service:" + Path(run_dir).name + ": " + names.str.split(":", n=1).str[1])
        frames.append(metrics.assign(local_model=renamed))
    merged = pd.concat(frames, ignore_index=True)
    out_dir = Path(out_dir)
    written = []
    for metric in ("similarity", "precision"):
        written += save_figure(score_vs_volume(merged, metric), out_dir / f"{metric}_vs_volume")
    plt.close("all")
    write_csv(out_dir / "metrics.csv", merged)
    return written


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def static_notebook(notebook):
    """The notebook with every widget view replaced by its static form (`text/html` the explorers carry, else
    their one-line text) and no saved widget state, so a page made from it needs no widget manager."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if WIDGET_VIEW in output.get("data", {}):
                output["data"].pop(WIDGET_VIEW)
    notebook.metadata.pop("widgets", None)
    return notebook


SETTINGS_TAGS = ("parameters", "injected-parameters", "settings")  # cells a reader of the page has no use for


def report_page(notebook, title: str, subtitle: str = ""):
    """The executed report notebook as a reader's page: the parameter cells and the settings section gone (code
    inputs are left out by the exporter), its heading replaced by the run's title, widgets in their static form."""
    from nbformat.v4 import new_markdown_cell

    notebook.cells = [c for c in notebook.cells if not set(c.metadata.get("tags", [])) & set(SETTINGS_TAGS)]
    first = notebook.cells[0] if notebook.cells else None
    if first is not None and first.cell_type == "markdown" and first.source.startswith("# "):
        first.source = first.source.split("\n", 1)[1].lstrip("\n") if "\n" in first.source else ""
    notebook.cells.insert(0, new_markdown_cell(f"# {title}" + (f"\n\n*{subtitle}*" if subtitle else "")))
    return static_notebook(notebook)


def page_title(run_dir: Path) -> tuple[str, str]:
    """("<run name>: service LLM → local model", "report of <date>, run folder <name>") from the run's records."""
    params = yaml.safe_load((run_dir / "params.yaml").read_text()) if (run_dir / "params.yaml").exists() else {}
    done = read_done(run_dir, "report") or {}
    made = str(done.get("finished_at") or time.strftime("%Y-%m-%dT%H:%M:%S"))[:16].replace("T", " ")
    service = (params.get("service") or {}).get("model") or "the service LLM"
    return (f"{params.get('run_name') or run_dir.name}: from {service} to a local model",
            f"LlamaDuo report of {made} · run folder {run_dir.name}")


def export_html(notebook: Path, target: Path) -> Path:
    """The executed report notebook as one standalone HTML file to hand in, written atomically: titled by the run,
    no code and no parameter cells, figures embedded, every widget shown by its static form, no script fetched from
    the network (it reads offline, from file://)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.require_js_url = ""  # nothing on the page needs a script loader or MathJax from a CDN
    exporter.mathjax_url = ""
    exporter.widget_renderer_url = ""
    title, subtitle = page_title(Path(target).parent)
    page = report_page(nbformat.read(notebook, as_version=4), title, subtitle)
    body, _ = exporter.from_notebook_node(page, resources={"metadata": {"name": title}})
    body = re.sub(r"<script src=\"\">\s*</script>", "", body)  # the emptied loaders' tags
    body = body.replace("</head>", PRINT_STYLE + "</head>", 1)
    return write_text(target, body)


# Printed (report.pdf, or the browser's print): JupyterLab keeps every output whole on a page, which leaves half
# pages empty before a long table or list; figures and table rows stay whole, text flows.
PRINT_STYLE = """<style>@media print {
  .jp-OutputArea-child { break-inside: auto; }
  img, svg, tr, li { break-inside: avoid; }
  h1, h2, h3 { break-after: avoid; }
}</style>
"""


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "microsoft-edge")


def find_browser() -> str | None:
    """A Chrome or Chromium on PATH ($LLAMADUO_BROWSER first), or None."""
    import shutil

    for name in filter(None, (os.environ.get("LLAMADUO_BROWSER"), *BROWSERS)):
        found = shutil.which(name)
        if found:
            return found
    return None


def export_pdf(html: Path, target: Path, timeout_s: float = 180.0) -> Path:
    """report.html printed to PDF by a headless Chrome/Chromium already on the machine, written atomically.

    Why not nbconvert's own paths: WebPDF drives Chromium through playwright, which downloads its own browser
    (`playwright install chromium`) — not possible offline; the LaTeX path needs a TeX installation (xelatex) and
    drops the widgets' static forms. Printing the finished page itself gives the PDF a reader sees in the browser."""
    import subprocess
    import tempfile

    browser = find_browser()
    if browser is None:
        raise UserError("report.pdf needs Chrome or Chromium on PATH (or $LLAMADUO_BROWSER): e.g. `apt-get install chromium`; "
                        "report.html prints to PDF from any browser too")
    html, target = Path(html).resolve(), Path(target)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        draft = Path(scratch) / "report.pdf"
        command = [browser, "--headless", "--disable-gpu", "--no-pdf-header-footer", f"--user-data-dir={scratch}/profile",
                   f"--print-to-pdf={draft}", html.as_uri()]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox (containers)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if not draft.exists() or draft.read_bytes()[:5] != b"%PDF-":
            raise UserError(f"{browser} did not print {html.name} to PDF (exit {done.returncode}): {done.stderr.strip()[-400:]}")
        os.replace(draft, target)
    return target
