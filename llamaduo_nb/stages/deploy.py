"""Stage 7 · deploy: the chosen local model exported for serving, and proof that the served model is the
one that was evaluated.

For each chosen cell (`deploy.cells`; default per task and local model, the smallest volume that meets
`cycle.target`, else the best) it writes, under `deploy/<task>/<model>/<volume>@c<cycle>/`:
- `merged/`: the adapter merged into its base (safetensors, tokenizer, chat template), for vLLM or transformers;
- `model.<quantization>.gguf`: the merged model for llama.cpp and Ollama (from a GGUF base), and `Modelfile`;
- `parity/`: the test prompts answered by the GGUF in a real llama.cpp server (K sampled answers and one
  greedy answer per prompt), their judgements by the run's judges, and the adapter's greedy answers.

The parity check compares, per judge and metric, the served model's scores with the adapter's (judged in
evaluate on the same prompts): mean, coverage@ζ, their CIs, and an equivalence test (TOST) of the paired
difference served − adapter over prompts (`methods/verdict.py`): "equivalent within ±deploy.parity_margin"
when its (1 − 2·cycle.alpha) interval lies inside the margin, "different" when it excludes 0, else "not shown
equivalent (too few prompts)": absence of evidence is never read as equivalence. Also how far the greedy
answers agree (identical ones; ones whose first words agree). "different", or greedy answers agreeing less
than `deploy.min_greedy_agreement`, is a warning on the console, in `deploy/cells.csv`, the report and
`manifest.json`: merges, quantisation and chat-template mismatches show up there. Without `llama-cpp-python[server]` the exports are written and the parity
check says it was not measured.

Also `deploy/COMMANDS.md`: the commands that serve each export with llama.cpp's server, Ollama and vLLM
(merged, or the adapter with `--lora-modules`). Units: an export is made from the adapter's content,
the base model, the chat template and `deploy.*`; a parity check from the export's content, the
sampling settings, the test prompts and the judges.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llamaduo_nb.stages.evaluate import judging
from llamaduo_nb import export, serving
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_csv_or_empty, read_json, read_jsonl, write_csv, write_json, write_jsonl
from llamaduo_nb.methods import verdict
from llamaduo_nb.methods.metrics import aggregate, answer_scores
from llamaduo_nb.core.models import PACKAGED_MODELS, model_identity, resolve, short_name
from llamaduo_nb.core.rows import with_cycle
from llamaduo_nb.core.params import CELL_PATTERN, Params, vllm_max_lora_rank
from llamaduo_nb.core.units import (Stage, StageResult, StageRun, Unit, content_fingerprint, cycle_folder, later_cycles, optional_file,
                                        root_of, stage_dir)
from llamaduo_nb.stages import coverage, evaluate, finetune
from llamaduo_nb.stages.infer import served_name, volume_seed
from llamaduo_nb.llm import cache_for
from llamaduo_nb.llm.served import answer, honours_n, server_config
from llamaduo_nb.core.models import generate_chat, load_model, load_tokenizer
from llamaduo_nb.llm import service_llm

CELLS_CSV = "cells.csv"
PARITY_CSV = "parity.csv"
COMMANDS_MD = "COMMANDS.md"
SERVER_PIP = serving.SERVER_PIP


# -- which cells ----------------------------------------------------------------------------------------------
def choose_cells(verdicts: pd.DataFrame, params: Params) -> list[dict]:
    """The cells to export: `deploy.cells`, or per (task, local model) the volume the verdict chose (the smallest
    trained volume the fixed sequence passed: `methods/verdict.py`, as the report's headline), else the best
    estimate (ties: the smaller volume).

    `verdicts`: `evaluate.run_verdicts`. Each: {task, local_model, volume, cycle, value, met, why}. The base model
    (volume 0) is never exported."""
    rule = evaluate.verdict_rule(params)
    data = with_cycle(verdicts[verdicts["volume"] > 0]) if len(verdicts) else verdicts
    if params.deploy.cells:
        return [_named_cell(cell, data) for cell in params.deploy.cells]
    chosen = []
    for (task, model), rows in data.groupby(["task", "local_model"], sort=True):
        passed = rows[rows["sequence"] == verdict.PASSED]
        if len(passed):
            best = passed.sort_values(["volume", "cycle"]).iloc[0]
            why = f"the smallest volume the verdict passed ({rule.describe()})"
        else:
            best = rows.assign(_e=rows["estimate"].astype(float).fillna(-1e9)).sort_values(
                ["_e", "volume", "cycle"], ascending=[False, True, False]).iloc[0]
            why = f"no volume passed ({rule.describe()}): the best estimate, {best['outcome']}"
        chosen.append({"task": task, "local_model": model, "volume": int(best["volume"]), "cycle": int(best["cycle"]),
                       "value": float(best["estimate"]), "met": bool(len(passed)), "why": why})
    return chosen


def _named_cell(cell: str, data: pd.DataFrame) -> dict:
    task, model, volume, cycle = CELL_PATTERN.match(cell).groups()
    rows = data[(data["task"] == task) & (data["local_model"] == model) & (data["volume"] == int(volume))] if len(data) else data
    if cycle and len(rows):
        rows = rows[rows["cycle"] == int(cycle)]
    if rows.empty:
        known = ", ".join(sorted({f"{r.task}/{r.local_model}/{int(r.volume)}" for r in data.itertuples()})) or "none"
        raise UserError(f"deploy.cells: '{cell}' was not trained and evaluated in this run (cells: {known})")
    best = rows.sort_values("cycle").iloc[-1]
    return {"task": task, "local_model": model, "volume": int(volume), "cycle": int(best["cycle"]),
            "value": float(best["estimate"]), "met": best["sequence"] == verdict.PASSED, "why": "it is named in deploy.cells"}


def cell_folder(run_dir: Path | str, cell: dict) -> Path:
    return stage_dir(run_dir, "deploy") / cell["task"] / cell["local_model"] / f"{cell['volume']}@c{cell['cycle']}"


def export_name(cell: dict) -> str:
    """The model name an export is served under (a server's --alias / --served-model-name): the name
    `infer.engine: openai` asks a server for, so a server of the exports answers every volume."""
    return served_name(cell["local_model"], cell["task"], cell["volume"])


def _model_ref(params: Params, model_name: str) -> str:
    for ref in params.finetune.base_models:
        if short_name(ref) == model_name:
            return ref
    raise UserError(f"deploy: local model '{model_name}' is not in finetune.base_models")


def _adapter(run_dir: Path, cell: dict) -> tuple[Path, str]:
    folder = cycle_folder(run_dir, cell["cycle"])
    runs = finetune.load_runs(folder)
    row = runs[(runs.task == cell["task"]) & (runs.local_model == cell["local_model"]) & (runs.volume == cell["volume"])]
    if row.empty:
        raise UserError(f"deploy: no adapter for {cell['task']}/{cell['local_model']}/{cell['volume']} in cycle {cell['cycle']}")
    return folder / row.iloc[0]["adapter"], str(row.iloc[0]["content"])


# -- the stage ------------------------------------------------------------------------------------------------
def _reads(params: Params, run_dir: Path) -> dict:
    # deploy picks among every cycle's adapters, by the verdicts of every cycle
    return {"cycles": later_cycles(run_dir, "evaluate"), "cycle_adapters": later_cycles(run_dir, "finetune"),
            "cycles.json": optional_file(root_of(run_dir) / "cycles.json"),
            "base_models": [model_identity(ref) for ref in params.finetune.base_models]}


STAGE = Stage("deploy", upstream=("coverage", "finetune", "evaluate"), reads=_reads, depends_on=(
    "seed", "tasks", "finetune.base_models", "finetune.chat_template", "infer", "evaluate", "service", "cycle.target", "cycle.alpha",
    "deploy.cells", "deploy.quantization", "deploy.merged_dtype", "deploy.chat_template", "deploy.parity", "deploy.min_greedy_agreement",
    "deploy.parity_margin", "finetune.search", "finetune.volumes", "cycle.max_cycles"))
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    if not (run_dir / "metrics.csv").exists():
        raise UserError(f"stage 'deploy' needs stage 'evaluate' to have finished in {run_dir} first")
    cells = choose_cells(evaluate.run_verdicts(params, run_dir), params)  # a bad deploy.cells fails before anything is written
    stage.begin()
    test = coverage.load(run_dir, "test")
    rows, parity_frames, warnings, outputs, redone = [], [], [], [COMMANDS_MD, CELLS_CSV], []
    can_serve = params.deploy.parity and serving.available()
    for cell in cells:
        folder = cell_folder(run_dir, cell)
        model_ref = _model_ref(params, cell["local_model"])
        adapter_dir, adapter_content = _adapter(run_dir, cell)
        record, exported_now = _export(params, cell, folder, model_ref, adapter_dir, adapter_content, force)
        redone += [f"{folder.relative_to(stage_dir(run_dir, 'deploy'))}"] if exported_now else []
        outputs.append(str(folder.relative_to(stage_dir(run_dir, "deploy"))))
        row = {**{k: cell[k] for k in ("task", "local_model", "volume", "cycle", "value", "met", "why")}, "name": export_name(cell),
               "quantization": params.deploy.quantization, "gguf": record.get("gguf"), "gguf_mb": record.get("gguf_mb"),
               "merged_mb": record.get("merged_mb"), "tokens_per_s": None, "parity": "", "warning": ""}
        prompts = [p for p in test if p["task"] == cell["task"]]
        if not record.get("gguf"):
            row["parity"] = f"not measured: {record.get('gguf_note')}"
        elif not params.deploy.parity:
            row["parity"] = "not measured: deploy.parity is false"
        elif not can_serve:
            row["parity"] = f"not measured: llama.cpp's server is not installed ({SERVER_PIP})"
        else:
            parity = _parity(params, run_dir, cell, folder, model_ref, adapter_dir, prompts, force)
            parity_frames.append(parity["table"])
            row.update(tokens_per_s=parity["tokens_per_s"], parity=parity["verdict"], warning=parity["warning"])
        if row["warning"]:
            warnings.append(f"deploy {row['name']}: {row['warning']}")
            print(f"WARNING {warnings[-1]}", flush=True)
        print(f"deploy {row['name']}: parity {row['parity']}", flush=True)
        rows.append(row)
    for stale in _stale_folders(run_dir, cells):  # exports of cells no longer chosen are not reported
        shutil.rmtree(stale)
    out = stage_dir(run_dir, "deploy")
    write_csv(out / CELLS_CSV, pd.DataFrame(rows))
    parity_table = pd.concat(parity_frames, ignore_index=True) if parity_frames else pd.DataFrame()
    if len(parity_table):
        write_csv(out / PARITY_CSV, parity_table)
        outputs.append(PARITY_CSV)
    else:
        (out / PARITY_CSV).unlink(missing_ok=True)
    commands = [dict(c, name=export_name(c), commands=read_json(cell_folder(run_dir, c) / "export" / "commands.json")) for c in cells]
    (out / COMMANDS_MD).write_text(export.commands_markdown(commands))
    return stage.finish({"exported": len(rows), "exported_now": len(redone), "parity_checked": len(parity_frames),
                         "warnings": len(warnings)}, outputs=outputs, units={"redone": redone}, extra={"warnings": warnings})


def _stale_folders(run_dir: Path, cells: list[dict]) -> list[Path]:
    wanted = {cell_folder(run_dir, c) for c in cells}
    return [p for p in stage_dir(run_dir, "deploy").glob("*/*/*@c*") if p.is_dir() and p not in wanted]


def _export(params: Params, cell: dict, folder: Path, model_ref: str, adapter_dir: Path, adapter_content: str,
            force: bool) -> tuple[dict, bool]:
    """Merged model, GGUF, Modelfile and commands of one cell (reused when made from the same things)."""
    cfg = params.deploy
    made_from = {"adapter": adapter_content, "base_model": model_identity(model_ref), "chat_template": params.finetune.chat_template,
                 "served_chat_template": cfg.chat_template, "quantization": cfg.quantization, "merged_dtype": cfg.merged_dtype,
                 "infer": {k: getattr(params.infer, k) for k in ("temperature", "top_p", "max_new_tokens")}}
    unit = Unit(folder / "export", folder / "export" / "UNIT.json", made_from)
    record = unit.current(force)
    if record:
        return record, False
    unit.discard()
    shutil.rmtree(folder, ignore_errors=True)  # the parity check of an earlier export goes with it
    target = folder / "export"
    target.mkdir(parents=True)
    began = time.time()
    print(f"deploy: merging {adapter_dir} into {model_ref} …", flush=True)
    merged, tokenizer = export.merge_adapter(model_ref, adapter_dir, params.finetune.chat_template)
    template = cfg.chat_template or tokenizer.chat_template
    tokenizer.chat_template = template
    export.save_merged(merged, tokenizer, target / "merged", cfg.merged_dtype)
    source = resolve(model_ref)
    gguf_name, note, checks = None, "", {}
    if source.gguf_file:
        gguf_name = f"model.{cfg.quantization}.gguf"
        try:
            checks = export.write_gguf(Path(source.location) / source.gguf_file, merged, target / gguf_name, cfg.quantization,
                                       template, export_name(cell))
        except UserError as exc:  # an architecture the writer does not invert: the merged model is still served by vLLM
            gguf_name, note = None, str(exc).removeprefix("deploy: ")
            print(f"deploy: {export_name(cell)}: no GGUF: {note}", flush=True)
    if gguf_name:
        (target / "Modelfile").write_text(export.modelfile(gguf_name, template, params.infer.temperature, params.infer.top_p,
                                                           params.infer.max_new_tokens))
    elif not source.gguf_file:
        note = ("the base model is not a GGUF: convert merged/ with llama.cpp's convert_hf_to_gguf.py "
                f"(python convert_hf_to_gguf.py {target / 'merged'} --outtype {cfg.quantization})")
    hub = PACKAGED_MODELS.get(model_ref, {}).get("hub") or (model_ref if source.kind == "hub" else None)
    try:  # vLLM builds its engine for one of a few ranks: the smallest that holds the adapter's
        lora_rank = vllm_max_lora_rank(params.finetune.lora.r)
    except ValueError:
        lora_rank = params.finetune.lora.r
    write_json(target / "commands.json", export.serve_commands(export_name(cell), target, gguf_name, model_ref, adapter_dir,
                                                              lora_rank, hub))
    del merged
    record = unit.commit(gguf=gguf_name and f"export/{gguf_name}", gguf_note=note, checks=checks,
                         gguf_mb=round(export.folder_size(target / gguf_name) / 2**20, 1) if gguf_name else None,
                         merged_mb=round(export.folder_size(target / "merged") / 2**20, 1), seconds=round(time.time() - began, 1))
    print(f"deploy: {export_name(cell)} exported in {record['seconds']} s (GGUF {record['gguf_mb']} MiB)", flush=True)
    return record, True


# -- parity -------------------------------------------------------------------------------------------------
def _parity(params: Params, run_dir: Path, cell: dict, folder: Path, model_ref: str, adapter_dir: Path, prompts: list[dict],
            force: bool) -> dict:
    """Serve the GGUF, answer and judge the test prompts, compare with the adapter. Reused when current."""
    gguf = folder / "export" / f"model.{params.deploy.quantization}.gguf"
    out = folder / "parity"
    made_from = {"gguf": content_fingerprint(gguf), "infer": params.infer.model_dump(mode="json", include={"k", "temperature", "top_p", "max_new_tokens"}),
                 "seed": params.seed, "prompts": coverage.prompts_fingerprint(prompts),
                 "judges": [j.model_dump(mode="json", include={"backend", "model", "base_url"}) for j in params.judges],
                 "evaluate": params.evaluate.model_dump(mode="json", include={"m", "temperature", "max_new_tokens", "prompt", "zetas"}),
                 "adapter_judgements": content_fingerprint(stage_dir(cycle_folder(run_dir, cell["cycle"]), "evaluate")),
                 "min_greedy_agreement": params.deploy.min_greedy_agreement, "parity_margin": params.deploy.parity_margin,
                 "alpha": params.cycle.alpha}
    unit = Unit(out, out / "UNIT.json", made_from)
    record = unit.current(force)
    if record:
        return {"table": pd.read_csv(out / "parity.csv"), "tokens_per_s": record["tokens_per_s"], "verdict": record["verdict"],
                "warning": record["warning"]}
    unit.discard()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    cfg = params.infer
    name = export_name(cell)
    seed = volume_seed(params, cell["task"], cell["volume"])
    with serving.LlamaServer(out / "server.log", model=gguf, alias=name) as server:
        config = server_config(server.url, name, max_concurrency=1)  # llama.cpp's server answers one request at a time
        began = time.time()
        sampled = answer(config, cache_for(run_dir), prompts, cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed,
                         use_n=honours_n(config), desc=f"deploy {name} · served answers", weights=made_from["gguf"])
        seconds = time.time() - began
        greedy_served = answer(config, cache_for(run_dir), prompts, 1, 0.0, 1.0, cfg.max_new_tokens, seed, use_n=False,
                               desc=f"deploy {name} · served greedy", weights=made_from["gguf"])
    tokens_per_s = round(sum(r["output_tokens"] or 0 for r in sampled) / max(seconds, 1e-9), 1)
    greedy_adapter = _adapter_greedy(params, model_ref, adapter_dir, prompts)
    identical, agreement = greedy_agreement(greedy_served, greedy_adapter)
    tag = dict(task=cell["task"], local_model=cell["local_model"], volume=cell["volume"])
    write_jsonl(out / "served_answers.jsonl", [dict(r, **tag) for r in sampled])
    write_jsonl(out / "greedy.jsonl", [{"prompt_id": s["prompt_id"], "served": s["response"], "adapter": a}
                                       for s, a in zip(greedy_served, [greedy_adapter[s["prompt_id"]] for s in greedy_served])])
    table = _judge_and_compare(params, run_dir, cell, out, pd.DataFrame([dict(r, **tag) for r in sampled]), prompts)
    table = table.assign(identical_greedy=identical, greedy_agreement=agreement, tokens_per_s=tokens_per_s)
    write_csv(out / "parity.csv", table)
    warning = _warning(table, agreement, params.deploy.min_greedy_agreement)
    outcome = parity_outcome(table)
    unit.commit(tokens_per_s=tokens_per_s, identical_greedy=identical, greedy_agreement=agreement, verdict=outcome, warning=warning)
    return {"table": table, "tokens_per_s": tokens_per_s, "verdict": outcome, "warning": warning}


def _adapter_greedy(params: Params, model_ref: str, adapter_dir: Path, prompts: list[dict]) -> dict:
    """The adapter's greedy answer per prompt, with transformers as infer answers (base + LoRA, not merged)."""
    from peft import PeftModel


    base = load_model(model_ref, "none")
    tokenizer = load_tokenizer(model_ref, params.finetune.chat_template)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    try:
        conversations = [({"role": "user", "content": p["instruction"]},) for p in prompts]
        answers = generate_chat(model, tokenizer, conversations, max_new_tokens=params.infer.max_new_tokens, temperature=0.0)
    finally:
        model.unload()  # give the cached base model back without LoRA layers
    return {p["prompt_id"]: gens[0].text.strip() for p, gens in zip(prompts, answers)}


FIRST_WORDS = 5  # greedy answers of the same model agree at least this far; numerical noise parts them later


def greedy_agreement(served: list[dict], adapter: dict, first_words: int = FIRST_WORDS) -> tuple[float, float]:
    """(share of prompts whose greedy answers are word-for-word identical, share whose first `first_words` words
    agree). q8_0 against float32 changes a word somewhere in a long answer, and greedy decoding follows it
    elsewhere from there; a wrong chat template or a broken merge changes the first words."""
    same, start = [], []
    for s in served:
        a, b = s["response"].split(), adapter.get(s["prompt_id"], "").split()
        same.append(a == b)
        start.append(a[:first_words] == b[:first_words])
    if not same:
        return float("nan"), float("nan")
    return round(float(np.mean(same)), 3), round(float(np.mean(start)), 3)


def _judge_and_compare(params: Params, run_dir: Path, cell: dict, out: Path, served: pd.DataFrame, prompts: list[dict]) -> pd.DataFrame:
    references = {p["prompt_id"]: p for p in prompts}
    evaluated = cycle_folder(run_dir, cell["cycle"])
    frames = []
    for judge in params.judges:
        jobs = judging.build_requests(params, judge, served, references, evaluated)
        results = service_llm(judge, params, run_dir).run([req for _, req in jobs], desc=f"deploy · judge ×{params.evaluate.m}")
        rows = [judging.judgement_row(meta, res) for (meta, _), res in zip(jobs, results)]
        if not any(r["valid"] for r in rows):
            raise UserError(f"deploy: none of the {len(rows)} judgements of the served answers by {judge.label} was valid")
        frames.append(pd.DataFrame(rows))
    judgements = pd.concat(frames, ignore_index=True)
    write_jsonl(out / "judgements.jsonl", judgements.to_dict("records"))
    alpha, margin = params.cycle.alpha, params.deploy.parity_margin
    served_metrics = aggregate(judgements, params.evaluate.zetas, 1 - 2 * alpha)
    adapter_judgements = evaluate.load_judgements(evaluated)
    keys = {"task": cell["task"], "local_model": cell["local_model"], "volume": cell["volume"]}
    mask = np.logical_and.reduce([adapter_judgements[k] == v for k, v in keys.items()])
    adapter_judgements = adapter_judgements[mask]
    adapter_metrics = aggregate(adapter_judgements, params.evaluate.zetas, 1 - 2 * alpha)
    served_scores, adapter_scores = answer_scores(judgements, unscored=True), answer_scores(adapter_judgements, unscored=True)
    stats = ["mean"] + [f"coverage_{z}" for z in params.evaluate.zetas]
    rows = []
    for judge in params.judges:
        for metric in ("similarity", "precision"):
            row = {**keys, "cycle": cell["cycle"], "judge": judge.label, "metric": metric}
            for form, frame in (("adapter", adapter_metrics), ("served", served_metrics)):
                hit = frame[(frame["judge"] == judge.label) & (frame["metric"] == metric)]
                for stat in stats:
                    for suffix in ("", "_ci_low", "_ci_high"):
                        row[f"{form}_{stat}{suffix}"] = float(hit[f"{stat}{suffix}"].iloc[0]) if len(hit) else float("nan")
            pick = lambda s: s[(s["judge"] == judge.label) & (s["metric"] == metric)][["prompt_id", "score"]]  # noqa: E731
            test = verdict.equivalence(pick(served_scores), pick(adapter_scores), margin, alpha)
            row.update(prompts=test.prompts, difference=test.estimate, difference_ci_low=test.low, difference_ci_high=test.high,
                       margin=margin, equivalence=test.outcome, equivalence_text=f"{metric} by {judge.label}: {test.text()}")
            rows.append(row)
    return pd.DataFrame(rows)


def parity_outcome(table: pd.DataFrame) -> str:
    """The cell's parity in one line: "different" when any judge and metric is, "equivalent within ±m" when all are,
    else "not shown equivalent" (too few prompts to tell), followed by each test."""
    outcomes = set(table["equivalence"])
    if verdict.DIFFERENT in outcomes:
        head = verdict.DIFFERENT
    elif outcomes == {verdict.EQUIVALENT}:
        head = f"{verdict.EQUIVALENT} within ±{float(table['margin'].iloc[0]):g}"
    else:
        head = f"{verdict.NOT_SHOWN_EQUIVALENT} (too few prompts)"
    return f"{head}: " + "; ".join(table["equivalence_text"])


def _warning(table: pd.DataFrame, agreement: float, min_agreement: float) -> str:
    """Why the served model does not look like the evaluated adapter ('' when nothing shows it)."""
    reasons = list(table.loc[table["equivalence"] == verdict.DIFFERENT, "equivalence_text"])
    if agreement == agreement and agreement < min_agreement:
        reasons.append(f"the greedy answers agree on their first {FIRST_WORDS} words for {agreement:.0%} of the test prompts "
                       f"(deploy.min_greedy_agreement {min_agreement:.0%})")
    if not reasons:
        return ""
    return ("the served model differs from the evaluated adapter: " + "; ".join(reasons)
            + " (check the chat template, the quantization, the merge)")


# -- what notebooks and the report read ------------------------------------------------------------------------
def load_cells(run_dir: Path | str) -> pd.DataFrame:
    return read_csv_or_empty(stage_dir(run_dir, "deploy") / CELLS_CSV)


def load_parity(run_dir: Path | str) -> pd.DataFrame:
    return read_csv_or_empty(stage_dir(run_dir, "deploy") / PARITY_CSV)


def load_greedy(run_dir: Path | str) -> pd.DataFrame:
    frames = [pd.DataFrame(read_jsonl(p)).assign(cell=str(p.parent.parent.relative_to(stage_dir(run_dir, "deploy"))))
              for p in sorted(stage_dir(run_dir, "deploy").glob("*/*/*/parity/greedy.jsonl"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def commands_text(run_dir: Path | str) -> str:
    path = stage_dir(run_dir, "deploy") / COMMANDS_MD
    return path.read_text() if path.exists() else ""


REPORT_CELL_COLUMNS = ["task", "local_model", "volume", "cycle", "why", "name", "quantization", "gguf_mb", "merged_mb", "tokens_per_s", "parity"]
REPORT_PARITY_COLUMNS = ["task", "local_model", "volume", "judge", "metric", "equivalence", "adapter_mean", "served_mean", "difference",
                         "difference_ci_low", "difference_ci_high", "margin", "prompts", "identical_greedy", "greedy_agreement"]


def summary(run_dir: Path | str) -> dict:
    """What the report shows of the deploy stage: the exported cells, the warnings, the parity table, the commands."""
    cells, parity = load_cells(run_dir), load_parity(run_dir)
    warnings = [w for w in cells.get("warning", pd.Series(dtype=object)).dropna().astype(str) if w]  # empty cells read back as NaN
    return {"cells": cells[[c for c in REPORT_CELL_COLUMNS if c in cells]] if len(cells) else cells, "warnings": warnings,
            "parity": parity[[c for c in REPORT_PARITY_COLUMNS if c in parity]] if len(parity) else parity,
            "commands": re.sub(r"^(#+) ", r"##\1 ", commands_text(run_dir), flags=re.M)}  # headings under the report's own
