"""ipywidgets explorers for the notebooks (they render in JupyterLab and classic Jupyter).

Each explorer reads every cycle of a run (cycle 1 is the run folder, cycle t ≥ 2 is
`<run>/cycle-<t>/`) and has a plain function behind it that tests use directly:
`synthetic_pairs` / `filter_pairs` (pair browser), `answer_table` (answer browser),
`coverage_table` (ζ slider), `verdict_sentences` (verdict explorer).

Every explorer also carries a static fallback (`text/html` beside the widget view): what a page
without a live kernel shows in its place (report.html is exported with these fallbacks, so it reads
offline with no widget area left empty): the fate counts of the synthetic pairs, the answers to the
first few test prompts of each task, the coverage@ζ tables for the run's ζ values.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from llamaduo_nb.stages.evaluate import competitor, judging
from llamaduo_nb.stages import coverage

from llamaduo_nb.stages import evaluate

from llamaduo_nb.stages import infer
from llamaduo_nb.core.rows import with_cycle
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.methods import verdict
from llamaduo_nb import figures, tables
from llamaduo_nb.methods.metrics import aggregate, answer_scores, coverage_at
from llamaduo_nb.core.rows import is_service
from llamaduo_nb.core.units import cycle_folders, root_of, stage_dir
from llamaduo_nb.stages.evaluate import verdict_rule

ALL = "all"


def _esc(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    return html.escape(str(value)).replace("\n", "<br>")


def _volume_label(volume, cycle=1) -> str:
    if int(volume) < 0:
        return "service LLM"
    return "base" if int(volume) == 0 else f"{int(volume)}" + (f" (cycle {int(cycle)})" if int(cycle) > 1 else "")


# -- synthetic pairs and their dedup fate -------------------------------------------------------------

PAIR_COLUMNS = ["cycle", "id", "task", "seed_prompt_id", "instruction", "response", "fate", "reason", "partner",
                "partner_id", "rouge_l", "jaccard", "seed_instruction", "seed_response", "service_model"]


def _pair_key(pair: dict):
    return pair["id"] if pair.get("id") is not None else (pair.get("task"), pair.get("instruction"), pair.get("response"))


def synthetic_pairs(run_dir: Path | str) -> pd.DataFrame:
    """Every synthetic pair of every cycle (synthesize/pairs.jsonl) with its dedup fate: `kept`, `removed`
    (with the reason and the partner it collided with, from deduplicate/removed.jsonl) or `pending` (that
    cycle's dedup has not run), and its seed pair from the coverage train split."""
    root = root_of(run_dir)
    train = stage_dir(root, "coverage") / "train.jsonl"
    seeds = {r["prompt_id"]: r for r in read_jsonl(train)} if train.exists() else {}
    rows = []
    for cycle, folder in cycle_folders(root):
        pairs_path = stage_dir(folder, "synthesize") / "pairs.jsonl"
        if not pairs_path.exists():
            continue
        dedup_dir = stage_dir(folder, "deduplicate")
        kept = {_pair_key(p) for p in read_jsonl(dedup_dir / "kept.jsonl")} if (dedup_dir / "kept.jsonl").exists() else None
        removed = {_pair_key(r): r for r in read_jsonl(dedup_dir / "removed.jsonl")} if (dedup_dir / "removed.jsonl").exists() else {}
        for pair in read_jsonl(pairs_path):
            key = _pair_key(pair)
            seed = seeds.get(pair.get("seed_prompt_id"), {})
            row = {"cycle": cycle, "id": pair.get("id"), "task": pair.get("task"), "seed_prompt_id": pair.get("seed_prompt_id"),
                   "instruction": pair.get("instruction"), "response": pair.get("response"), "fate": "pending",
                   "seed_instruction": seed.get("instruction"), "seed_response": seed.get("reference"),
                   "service_model": pair.get("service_model")}
            if key in removed:
                r = removed[key]
                row.update(fate="removed", reason=r.get("reason"), partner=r.get("partner"), partner_id=r.get("partner_id"),
                           rouge_l=r.get("rouge_l"), jaccard=r.get("jaccard"))
            elif kept is not None and key in kept:
                row["fate"] = "kept"
            rows.append(row)
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def filter_pairs(frame: pd.DataFrame, task=None, seed=None, fate=None, cycle=None) -> pd.DataFrame:
    """The rows of `synthetic_pairs` matching every filter given (None or "all": no filter).

    `fate`: "kept", "removed", "pending", or a removal reason ("exact", "near_duplicate",
    "too_close_to_earlier", "test_leakage"). `seed`: a seed prompt_id. `cycle`: a cycle number.
    """
    mask = pd.Series(True, index=frame.index)
    if task not in (None, ALL):
        mask &= frame["task"] == task
    if seed not in (None, ALL):
        mask &= frame["seed_prompt_id"] == seed
    if fate not in (None, ALL):
        mask &= (frame["fate"] == fate) | ((frame["fate"] == "removed") & (frame["reason"] == fate))
    if cycle not in (None, ALL):
        mask &= frame["cycle"] == int(cycle)
    return frame[mask].reset_index(drop=True)


def fate_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Pairs per (cycle, task) and fate: kept, and removed by reason (the pair browser's static fallback)."""
    if frame.empty:
        return pd.DataFrame(columns=["cycle", "task"])
    fate = frame["fate"].where(frame["fate"] != "removed", "removed: " + frame["reason"].fillna("?").astype(str))
    return frame.assign(fate=fate).groupby(["cycle", "task", "fate"]).size().unstack(fill_value=0).reset_index()


def _render_pair(row) -> str:
    box = "style='white-space:pre-wrap;border-left:3px solid {};padding:2px 8px;margin:4px 0'"
    if row.fate == "removed":
        closeness = ", ".join(f"{name} {value:.2f}" for name, value in (("ROUGE-L", row.rouge_l), ("Jaccard", row.jaccard))
                              if value is not None and not pd.isna(value))
        fate = (f"<b style='color:#c8553d'>removed: {_esc(row.reason)}</b>" + (f" ({closeness})" if closeness else "")
                + f"<div {box.format('#c8553d')}><i>partner {_esc(row.partner_id)}:</i><br>{_esc(row.partner)}</div>")
    else:
        colour = "#4c9a5a" if row.fate == "kept" else "#888"
        fate = f"<b style='color:{colour}'>{_esc(row.fate)}</b>"
    return (
        f"<p><b>{_esc(row.id)}</b> · task {_esc(row.task)} · cycle {row.cycle} · {_esc(row.service_model)} · {fate}</p>"
        f"<h4>Instruction</h4><div {box.format('#4477aa')}>{_esc(row.instruction)}</div>"
        f"<h4>Response</h4><div {box.format('#4477aa')}>{_esc(row.response)}</div>"
        f"<h4>Seed pair ({_esc(row.seed_prompt_id)})</h4>"
        f"<div {box.format('#bbb')}><i>instruction:</i><br>{_esc(row.seed_instruction)}</div>"
        f"<div {box.format('#bbb')}><i>reference:</i><br>{_esc(row.seed_response)}</div>"
    )


def _explorer(name: str, children, fallback_html: str = ""):
    """A VBox whose text form is one short line and whose static form (`text/html`, what a page without a
    live kernel shows in its place) is `fallback_html`."""
    import ipywidgets as w

    note = f"[{name}: an interactive explorer; open the notebook in JupyterLab or Jupyter to use it]"

    class Explorer(w.VBox):
        def __repr__(self) -> str:
            return note

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            bundle["text/html"] = (f"<div class='llamaduo-static'><p><i>{html.escape(name)}, static copy "
                                   f"(open the notebook in JupyterLab to explore):</i></p>{fallback_html}</div>")
            return bundle

    return Explorer(children)


def _table_html(frame: pd.DataFrame, caption: str = "") -> str:
    body = frame.to_html(index=False, escape=True, na_rep="–", float_format=lambda v: f"{v:.1f}", border=0)
    return (f"<p><b>{html.escape(caption)}</b></p>" if caption else "") + body


def pair_browser(run_dir: Path | str):
    """Browse the synthetic pairs of every cycle; filter by task, seed prompt, dedup fate and cycle;
    step through the matching pairs and see each one, its fate (reason and partner when removed)
    and the seed pair it came from."""
    import ipywidgets as w

    frame = synthetic_pairs(run_dir)
    reasons = sorted(r for r in frame["reason"].dropna().unique())
    task_box = w.Dropdown(options=[ALL] + sorted(frame["task"].dropna().unique()), description="task")
    seed_box = w.Dropdown(description="seed", layout=w.Layout(width="60%"))
    fate_box = w.Dropdown(options=[ALL, "kept", "removed", "pending"] + reasons, description="fate")
    cycle_box = w.Dropdown(options=[ALL] + [int(c) for c in sorted(frame["cycle"].unique())], description="cycle")
    pick = w.IntSlider(min=1, max=1, value=1, description="pair", continuous_update=False, layout=w.Layout(width="60%"))
    count = w.HTML()
    out = w.HTML()
    shown = {"rows": frame.iloc[0:0]}

    def seeds_for(task):
        sub = filter_pairs(frame, task=task)
        per_seed = sub.groupby("seed_prompt_id", sort=False).agg(n=("id", "size"), text=("seed_instruction", "first"))
        return [(ALL, ALL)] + [(f"{str(r.text or '')[:60]}… ({r.n} pairs)", sid) for sid, r in per_seed.iterrows()]

    def refresh(*_):
        rows = filter_pairs(frame, task_box.value, seed_box.value, fate_box.value, cycle_box.value)
        shown["rows"] = rows
        count.value = f"<b>{len(rows)}</b> of {len(frame)} pairs"
        pick.unobserve(show, names="value")
        pick.max, pick.value, pick.disabled = max(1, len(rows)), 1, len(rows) <= 1
        pick.observe(show, names="value")
        show()

    def show(*_):
        rows = shown["rows"]
        out.value = _render_pair(rows.iloc[pick.value - 1]) if len(rows) else "<i>no pair matches</i>"

    def on_task(_):
        seed_box.unobserve(refresh, names="value")
        seed_box.options = seeds_for(task_box.value)
        seed_box.value = ALL
        seed_box.observe(refresh, names="value")
        refresh()

    seed_box.options = seeds_for(ALL)
    seed_box.value = ALL
    task_box.observe(on_task, names="value")
    for box in (seed_box, fate_box, cycle_box):
        box.observe(refresh, names="value")
    pick.observe(show, names="value")
    refresh()
    fallback = _table_html(fate_counts(frame), "Synthetic pairs per cycle, task and fate") if len(frame) else "<i>no synthetic pairs</i>"
    return _explorer("synthetic-pair browser", [w.HBox([task_box, fate_box, cycle_box]), seed_box, w.HBox([pick, count]), out],
                     fallback)


# -- answers and their judgements ----------------------------------------------------------------------


def _across_cycles(load, run_dir: Path | str) -> pd.DataFrame:
    """`load(folder)` for every cycle folder, with a `cycle` column; the base model (volume 0), answered
    again in every cycle, kept once (its first cycle)."""
    frames = []
    for cycle, folder in cycle_folders(run_dir):
        frame = load(folder)
        if not frame.empty:
            frames.append(frame.assign(cycle=cycle))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    once = out["volume"] <= 0  # the base model (0) and the service LLM (-1) answer alike in every cycle
    first = out.loc[once, "cycle"].min()
    return out[~once | (out["cycle"] == first)].reset_index(drop=True)


def _all_answers(folder: Path) -> pd.DataFrame:
    """A cycle's answers: the local models' (infer) and the service LLM's own (evaluate/service_answers)."""
    return pd.concat([infer.load_responses(folder), competitor.load_service_answers(folder)], ignore_index=True)


def load_answers(run_dir: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(judgements, responses) of every cycle; the service LLM's answers are rows with local_model `service:<label>`."""
    return _across_cycles(evaluate.load_judgements, run_dir), _across_cycles(_all_answers, run_dir)


def _scores_text(values) -> str:
    values = [v for v in values if not pd.isna(v)]
    return " · ".join(f"{v:g}" for v in values)


def answer_table(run_dir: Path | str, prompt_id: str, judgements: pd.DataFrame, responses: pd.DataFrame) -> pd.DataFrame:
    """Every answer to one prompt (each cycle, local model, volume and k) × every judge: the mean of the
    judge's valid repeats, each repeat's score, how many repeats failed, and the first valid repeat's reasons."""
    answers = with_cycle(responses[responses["prompt_id"] == prompt_id])[["cycle", "local_model", "volume", "k", "response"]]
    answers = answers.assign(answer_id=[judging.answer_id(r.local_model, r.volume, r.k, r.cycle) for r in answers.itertuples()])
    j = with_cycle(judgements[judgements["prompt_id"] == prompt_id]) if not judgements.empty else judgements
    if j.empty:
        return answers.assign(judge=None, similarity=float("nan"), precision=float("nan"))
    j = j.assign(valid=j["valid"].fillna(False).astype(bool))
    keys = ["cycle", "local_model", "volume", "k", "judge"]
    valid = j[j["valid"]]
    scores = valid.groupby(keys).agg(
        similarity=("similarity", "mean"), precision=("precision", "mean"),
        similarity_all=("similarity", _scores_text), precision_all=("precision", _scores_text),
        similarity_reason=("similarity_reason", "first"), precision_reason=("precision_reason", "first"),
    )
    counts = j.groupby(keys).agg(judgements=("valid", "size"), failed=("valid", lambda v: int((~v).sum())))
    table = counts.join(scores, how="left").reset_index()
    return answers.merge(table, on=["cycle", "local_model", "volume", "k"], how="left").sort_values(
        ["local_model", "volume", "cycle", "k", "judge"], kind="stable").reset_index(drop=True)


def _judge_block(rows: pd.DataFrame) -> str:
    parts = []
    for r in rows.itertuples():
        if pd.isna(r.judge):
            parts.append("<i>not judged</i>")
            continue
        failed = f" <span style='color:#c8553d'>({int(r.failed)} of {int(r.judgements)} failed)</span>" if r.failed else ""
        sim = "–" if pd.isna(r.similarity) else f"{r.similarity:.0f}"
        pre = "–" if pd.isna(r.precision) else f"{r.precision:.0f}"
        many = isinstance(r.similarity_all, str) and "·" in r.similarity_all
        parts.append(
            f"<b>{_esc(r.judge)}</b>{failed}: similarity <b>{sim}</b>"
            + (f" <small>({_esc(r.similarity_all)})</small>" if many else "")
            + f", precision <b>{pre}</b>" + (f" <small>({_esc(r.precision_all)})</small>" if many else "")
            + f"<div style='font-size:85%;color:#444'>similarity: {_esc(r.similarity_reason)}<br>precision: {_esc(r.precision_reason)}</div>"
        )
    return "<hr style='margin:2px 0'>".join(parts)


ANSWER_CELL = "text-align:left;white-space:pre-wrap;max-width:32em;vertical-align:top"


def _render(prompt: dict, table: pd.DataFrame) -> str:
    """The prompt, its reference, and a row per local answer with the service LLM's answer of the same k beside it."""
    service_mask = is_service(table["local_model"]).to_numpy() if len(table) else []
    service, local = table[service_mask], table[~service_mask] if len(table) else table
    by_k = {k: group for k, group in service.groupby("k", sort=False)}
    name = str(service["local_model"].iloc[0]).split(":", 1)[1] if len(service) else None
    rows = []
    for (model, volume, cycle, k), group in local.groupby(["local_model", "volume", "cycle", "k"], sort=False):
        theirs = by_k.get(k)
        service_cells = "" if name is None else (
            "<td>–</td><td>–</td>" if theirs is None else
            f"<td style='{ANSWER_CELL}'>{_esc(theirs['response'].iloc[0])}<br><small>id {_esc(theirs['answer_id'].iloc[0])}</small></td>"
            f"<td style='text-align:left;vertical-align:top'>{_judge_block(theirs)}</td>")
        rows.append(
            f"<tr><td>{_esc(model)}</td><td>{_volume_label(volume, cycle)}</td><td>{k}</td>"
            f"<td style='{ANSWER_CELL}'>{_esc(group['response'].iloc[0])}<br><small>id {_esc(group['answer_id'].iloc[0])}</small></td>"
            f"<td style='text-align:left;vertical-align:top'>{_judge_block(group)}</td>{service_cells}</tr>"
        )
    service_head = "" if name is None else f"<th>service LLM {_esc(name)}: its answer (same k)</th><th>its judges</th>"
    return (
        f"<p><small>prompt_id {_esc(prompt.get('prompt_id'))}</small></p>"
        f"<h4>Instruction</h4><div style='white-space:pre-wrap'>{_esc(prompt['instruction'])}</div>"
        f"<h4>Human reference</h4><div style='white-space:pre-wrap'>{_esc(prompt['reference'])}</div>"
        "<h4>Answers</h4><table><tr><th>model</th><th>volume</th><th>k</th><th>answer</th>"
        f"<th>judges: mean score (each repeat), reasons</th>{service_head}</tr>{''.join(rows)}</table>"
    )


def static_answers(run_dir: Path | str, per_task: int = 2) -> str:
    """The answer browser's static form: the first `per_task` test prompts of each task, rendered as the browser shows them."""
    test = coverage.load(run_dir, "test")
    judgements, responses = load_answers(run_dir)
    parts = []
    for task in sorted({p["task"] for p in test}):
        for prompt in [p for p in test if p["task"] == task][:per_task]:
            parts.append(f"<h3>{_esc(task)}</h3>" + _render(prompt, answer_table(run_dir, prompt["prompt_id"], judgements, responses)))
    return "<hr>".join(parts) or "<i>no answers</i>"


def answer_browser(run_dir: Path | str):
    """Pick a task and a test prompt; see the reference, the K answers of every volume (every cycle) and
    every judge's scores and reasons."""
    import ipywidgets as w

    test = coverage.load(run_dir, "test")
    by_id = {p["prompt_id"]: p for p in test}
    judgements, responses = load_answers(run_dir)
    tasks = sorted({p["task"] for p in test})
    task_box = w.Dropdown(options=tasks, description="task")
    prompt_box = w.Dropdown(description="prompt", layout=w.Layout(width="70%"))
    out = w.HTML()

    def options(task):
        return [(f"{i + 1}. {p['instruction'][:70]}…", p["prompt_id"]) for i, p in enumerate(p for p in test if p["task"] == task)]

    def show(*_):
        if prompt_box.value:
            out.value = _render(by_id[prompt_box.value], answer_table(run_dir, prompt_box.value, judgements, responses))

    def on_task(change):
        prompt_box.options = options(change["new"])
        prompt_box.value = prompt_box.options[0][1] if prompt_box.options else None

    task_box.observe(on_task, names="value")
    prompt_box.observe(show, names="value")
    prompt_box.options = options(tasks[0])
    prompt_box.value = prompt_box.options[0][1]
    show()
    return _explorer("answer browser", [w.HBox([task_box, prompt_box]), out], static_answers(run_dir))


# -- coverage@ζ, live ----------------------------------------------------------------------------------


def coverage_table(scores: pd.DataFrame, zeta: float, metric: str = "precision", judge: str | None = None,
                   local_model: str | None = None) -> pd.DataFrame:
    """coverage@ζ (%) of the answer scores (metrics.answer_scores, with a `cycle` column) of one metric,
    judge and local model (default: the first of each); rows: volumes (base once, later cycles labelled)
    and, when it answered the test prompts, the service LLM (last row); columns: tasks."""
    sub = with_cycle(scores[scores["metric"] == metric])
    service_mask = is_service(sub["local_model"]).to_numpy() if len(sub) else []
    service, sub = sub[service_mask], sub[~service_mask] if len(sub) else sub
    judge = judge or (sub["judge"].iloc[0] if len(sub) else None)
    local_model = local_model or (sub["local_model"].iloc[0] if len(sub) else None)
    sub = sub[(sub["judge"] == judge) & (sub["local_model"] == local_model)]
    service = service[service["judge"] == judge]
    service = service[service["cycle"] == service["cycle"].min()] if len(service) else service
    table = pd.concat([sub, service]).groupby(["volume", "cycle", "task"])["score"].apply(lambda s: coverage_at(s, zeta)).unstack("task")
    table = table.sort_index(key=lambda index: index.map(lambda v: v if v >= 0 else float("inf")) if index.name == "volume" else index)
    table.index = [_volume_label(v, c) for v, c in table.index]
    return table


def static_coverage_tables(scores: pd.DataFrame, zetas=(50, 70), metrics=("precision", "similarity")) -> str:
    """The ζ slider's static form: the coverage@ζ table for each listed ζ and metric (first judge and local model)."""
    if scores.empty:
        return "<i>no judged answers</i>"
    parts = []
    for metric in metrics:
        for zeta in zetas:
            table = coverage_table(scores, zeta, metric).round(1).rename_axis(columns=None).reset_index().rename(columns={"index": "volume"})
            parts.append(_table_html(table, f"coverage@{zeta} of {metric} (% of answers scoring ≥ {zeta})"))
    return "".join(parts)


def zeta_slider(run_dir: Path | str, metric: str = "precision", zetas=(50, 70)):
    """A ζ slider (and metric, judge pickers) that recomputes coverage@ζ per task and volume, with its 95 % CI, from
    the judgements of every cycle and redraws the report's coverage figure (the service LLM as its dash-dot line and
    band); its static form holds the tables for `zetas`."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    judgements = _across_cycles(evaluate.load_judgements, run_dir)
    scores = answer_scores(judgements)
    judges = list(dict.fromkeys(scores["judge"]))
    local = scores[~is_service(scores["local_model"]).to_numpy()] if len(scores) else scores
    models = sorted(set(local["local_model"])) if len(local) else [None]  # the static figure's order: the first is its default

    def draw(zeta, metric, judge, model):
        from IPython.display import display

        # the report's own coverage figure, recomputed for this ζ with its 95 % CIs (metrics.aggregate, as metrics.csv)
        recomputed = aggregate(judgements[judgements["judge"] == judge], (zeta,))
        fig = figures.coverage_bars(recomputed, metric, (zeta,), local_model=model, judge=judge)
        display(fig)  # this figure only: plt.show() would also pull in the cell's other open figures
        plt.close(fig)

    live = w.interactive(
        draw, zeta=w.IntSlider(value=50, min=0, max=100, step=5, description="ζ", continuous_update=False),
        metric=w.Dropdown(options=["precision", "similarity"], value=metric, description="metric"),
        judge=w.Dropdown(options=judges, description="judge"),
        model=w.Dropdown(options=models, description="local model"),
    )
    return _explorer("ζ slider", [live], static_coverage_tables(scores, zetas))


def verdict_sentences(scores: pd.DataFrame, rule, params) -> tuple[list[str], pd.DataFrame]:
    """The verdict's sentences and table for `rule` (`methods/verdict.py`, as the report computes them)."""
    table = verdict.verdict_table(scores, rule, params.infer.k, params.evaluate.m, params.service.label)
    lines = [verdict.rule_line(rule)] + [verdict.sentence(r, rule, params.service.label) for r in verdict.summary(table).to_dict("records")]
    return lines, table


def verdict_explorer(params, run_dir: Path | str):
    """The verdict recomputed for another margin δ (a target relative to the service LLM) or threshold (an absolute
    one) and another α, from the run's answer scores: how sure is the answer, and how much does it hang on δ.
    Its static form holds the run's own verdict."""
    import dataclasses

    import ipywidgets as w
    from IPython.display import Markdown, display


    scores = evaluate.load_answer_scores(run_dir)
    base = verdict_rule(params)
    columns = ["task", "local_model", "volume", "cycle", "outcome", "sequence", "chosen", "estimate", "low", "high", "prompts"]

    def show(bound_value, alpha):
        if base.versus_service:
            rule = dataclasses.replace(base, offset=-float(bound_value), alpha=float(alpha))
        else:
            rule = dataclasses.replace(base, threshold=float(bound_value), alpha=float(alpha))
        lines, table = verdict_sentences(scores, rule, params)
        display(Markdown("\n".join("- " + line for line in lines)))
        display(tables.for_reading(table[columns], lead=["outcome", "chosen", "estimate", "sequence"],
                                   intervals={"estimate": ("low", "high")}))

    if base.versus_service:
        bound = w.FloatSlider(value=base.margin, min=0, max=30, step=0.5, description="margin δ", continuous_update=False)
    else:
        bound = w.FloatSlider(value=base.threshold, min=0, max=100, step=1, description="threshold", continuous_update=False)
    alpha = w.Dropdown(options=[0.005, 0.0125, 0.025, 0.05, 0.1], value=base.alpha if base.alpha in (0.005, 0.0125, 0.025, 0.05, 0.1) else 0.025,
                       description="α (one-sided)")
    live = w.interactive(show, bound_value=bound, alpha=alpha)
    lines, _ = verdict_sentences(scores, base, params)
    static = "<ul>" + "".join(f"<li>{_esc(line)}</li>" for line in lines) + "</ul>"
    return _explorer("verdict explorer", [live], static)
