"""Stage 5 · infer: every fine-tuned model answers every test prompt K times.

Reads: `coverage/test.jsonl`, `finetune/runs.csv` and the adapters. Writes:
`infer/<task>/<model>/<volume>.jsonl` (prompt_id, volume, k, response, tokens, latency) with its
unit record `<volume>.jsonl.unit.json`, `infer/summary.csv`, DONE.json. Volume 0 is the base model
without an adapter, the baseline every volume is compared with. `infer.engine` picks transformers
(default), vLLM's offline engine (CUDA) or any OpenAI-compatible server.

Units: one answer file per (task, model, volume), made from `infer.*` (K, sampling, batch size:
the generation seed is per batch), the seed, the base model and chat template, the task's test
prompts and the content of the adapter's weights. Only files whose unit is not current are
answered again; files of cells no longer in the grid are moved to `orphaned/`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from llamaduo_nb.progress import tqdm

from llamaduo_nb.stages import coverage

from llamaduo_nb.stages import finetune
from llamaduo_nb.errors import UserError
from llamaduo_nb.io import fingerprint, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.models import generate_chat, load_model, load_tokenizer, short_name
from llamaduo_nb.pipeline.params import Params
from llamaduo_nb.pipeline.units import StageResult, StageRun, Unit, cycle_folder, cycle_of, read_done, set_aside, stage_dir


def unit_path(run_dir: Path | str, task: str, model: str, volume: int) -> Path:
    return stage_dir(run_dir, "infer") / task / model / f"{volume}.jsonl"


def _conversations(prompts: list[dict]) -> list[tuple]:
    return [({"role": "user", "content": p["instruction"]},) for p in prompts]


def _answer_transformers(model, tokenizer, prompts: list[dict], params: Params, seed: int, desc: str) -> list[dict]:
    cfg = params.infer
    rows = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False):
        batch = prompts[start : start + cfg.batch_size]
        began = time.time()
        answers = generate_chat(
            model, tokenizer, _conversations(batch), max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, num_return_sequences=cfg.k, seed=seed + start,
        )
        latency = (time.time() - began) / max(1, len(batch))
        for prompt, gens in zip(batch, answers):
            for k, g in enumerate(gens):
                rows.append({"prompt_id": prompt["prompt_id"], "k": k, "response": g.text, "output_tokens": g.output_tokens,
                             "input_tokens": g.input_tokens, "finish_reason": g.finish_reason, "latency_s": round(latency, 3)})
    return rows


def _check_engine(params: Params) -> None:
    engine = params.infer.engine
    if engine == "vllm":
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise UserError("infer.engine: vllm needs the vllm package and a CUDA GPU (pip install vllm); use engine: transformers on a CPU")
    if engine == "openai" and not params.infer.base_url:
        raise UserError("infer.engine: openai needs infer.base_url (an OpenAI-compatible server serving the adapters)")


def _answer_vllm(params: Params, run_dir: Path, task: str, model_ref: str, units: list[dict], prompts: list[dict]) -> dict:
    """vLLM offline engine with one LoRARequest per volume (CUDA only)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from llamaduo_nb.models import resolve

    cfg = params.infer
    src = resolve(model_ref)
    location = str(Path(src.location) / src.gguf_file) if src.gguf_file else src.location
    llm = LLM(model=location, enable_lora=True, max_lora_rank=max(64, params.finetune.lora.r), seed=params.seed)
    tokenizer = llm.get_tokenizer()
    texts = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in _conversations(prompts)]
    sampling = SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=params.seed)
    out = {}
    for i, unit in enumerate(units):
        lora = LoRARequest(f"v{unit['volume']}", i + 1, str(Path(run_dir) / unit["adapter"])) if unit["volume"] else None
        began = time.time()
        results = llm.generate(texts, sampling, lora_request=lora)
        latency = (time.time() - began) / max(1, len(prompts))
        rows = []
        for prompt, res in zip(prompts, results):
            for k, o in enumerate(res.outputs):
                rows.append({"prompt_id": prompt["prompt_id"], "k": k, "response": o.text.strip(), "output_tokens": len(o.token_ids),
                             "input_tokens": len(res.prompt_token_ids), "finish_reason": o.finish_reason, "latency_s": round(latency, 3)})
        out[unit["volume"]] = rows
    return out


def _answer_openai(params: Params, task: str, model_name: str, volume: int, prompts: list[dict]) -> list[dict]:
    """Any OpenAI-compatible server that serves the adapter under the name `<model>-<task>-<volume>`."""
    from openai import OpenAI

    cfg = params.infer
    client = OpenAI(base_url=cfg.base_url, api_key="not-needed")
    name = model_name if volume == 0 else f"{model_name}-{task}-{volume}"
    rows = []
    for prompt in tqdm(prompts, desc=f"{task} v{volume}", leave=False):
        began = time.time()
        resp = client.chat.completions.create(model=name, messages=list(_conversations([prompt])[0]), n=cfg.k,
                                              temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
        for k, choice in enumerate(resp.choices):
            rows.append({"prompt_id": prompt["prompt_id"], "k": k, "response": (choice.message.content or "").strip(),
                         "output_tokens": None, "input_tokens": None, "finish_reason": choice.finish_reason,
                         "latency_s": round(time.time() - began, 3)})
    return rows


def answer_unit(params: Params, run_dir: Path | str, task: str, model_ref: str, volume: int, prompts: list[dict],
                adapter_content: str | None) -> Unit:
    made_from = {
        "infer": params.infer.model_dump(mode="json"), "seed": params.seed, "base_model": model_ref,
        "chat_template": params.finetune.chat_template, "volume": volume, "adapter": adapter_content,
        "prompts": fingerprint([[p["prompt_id"], p["instruction"]] for p in prompts]),
    }
    return Unit.file(unit_path(run_dir, task, short_name(model_ref), volume), made_from)


def run(params: Params, run_dir: Path | str, force: bool = False) -> StageResult:
    stage = StageRun("infer", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
    _check_engine(params)
    stage.begin()
    test = coverage.load(run_dir, "test")
    runs = finetune.load_runs(run_dir)
    summary, redone, outputs = [], [], []
    wanted = set()
    for task in params.tasks:
        prompts = [p for p in test if p["task"] == task]
        for model_ref in params.finetune.base_models:
            model_name = short_name(model_ref)
            adapters = runs[(runs.task == task) & (runs.local_model == model_name)].sort_values("volume")
            cells = [{"volume": 0, "adapter": None, "content": None}]
            cells += [{"volume": int(r.volume), "adapter": r.adapter, "content": r.content} for r in adapters.itertuples()]
            units = {c["volume"]: answer_unit(params, run_dir, task, model_ref, c["volume"], prompts, c["content"]) for c in cells}
            wanted |= {u.outputs[0] for u in units.values()}
            todo = [c for c in cells if not units[c["volume"]].current(force)]
            if cycle_of(run_dir) > 1 and any(c["volume"] == 0 for c in todo) and _reuse_base_answers(params, run_dir, units[0], force):
                todo = [c for c in todo if c["volume"] != 0]  # the base model is the same in every cycle
            for c in todo:
                units[c["volume"]].discard()
            answers: dict = {}
            if todo and params.infer.engine == "vllm":
                answers = _answer_vllm(params, Path(run_dir), task, model_ref, todo, prompts)
            elif todo and params.infer.engine == "openai":
                answers = {c["volume"]: _answer_openai(params, task, model_name, c["volume"], prompts) for c in todo}
            elif todo:
                answers = _answer_all_volumes(params, Path(run_dir), task, model_ref, todo, prompts)
            for cell in cells:
                unit = units[cell["volume"]]
                path = unit.outputs[0]
                if cell["volume"] in answers:
                    rows = [dict(r, task=task, local_model=model_name, volume=cell["volume"]) for r in answers[cell["volume"]]]
                    write_jsonl(path, rows)  # one file per volume: a crash loses at most the volume in progress
                    unit.commit(task=task, local_model=model_name, volume=cell["volume"], answers=len(rows))
                    redone.append(f"{task}/{model_name}/{cell['volume']}")
                rows = read_jsonl(path)
                outputs.append(str(path.relative_to(stage_dir(run_dir, "infer"))))
                summary.append({"task": task, "local_model": model_name, "volume": cell["volume"], "answers": len(rows),
                                "mean_output_tokens": round(sum(r["output_tokens"] or 0 for r in rows) / max(1, len(rows)), 1),
                                "truncated": sum(r["finish_reason"] == "length" for r in rows),
                                "mean_latency_s": round(sum(r["latency_s"] for r in rows) / max(1, len(rows)), 3)})
    present = set(stage_dir(run_dir, "infer").glob("*/*/*.jsonl"))
    set_aside(run_dir, "infer", sorted(present - wanted), "task, local model or volume dropped from the params")
    frame = pd.DataFrame(summary)
    write_csv(stage_dir(run_dir, "infer") / "summary.csv", frame)
    return stage.finish({"units": len(summary), "answered": len(redone), "reused": len(summary) - len(redone),
                         "answers": int(frame["answers"].sum()) if len(frame) else 0},
                        outputs=outputs, units={"redone": redone})


def _reuse_base_answers(params: Params, run_dir: Path | str, unit: Unit, force: bool) -> bool:
    """Copy cycle 1's base-model answers when they were made from the same things (a forced infer answers anew)."""
    first = Unit.file(unit_path(cycle_folder(run_dir, 1), *unit.outputs[0].parts[-3:-1], 0), unit.made_from)
    if force or not first.current():
        return False
    write_jsonl(unit.outputs[0], read_jsonl(first.outputs[0]))
    unit.commit(copied_from=str(first.outputs[0].relative_to(cycle_folder(run_dir, 1))))
    return True


def _answer_all_volumes(params: Params, run_dir: Path, task: str, model_ref: str, units: list[dict], prompts: list[dict]) -> dict:
    """transformers: load the base once, attach each volume's adapter in turn (base model for volume 0)."""
    from peft import PeftModel

    base = load_model(model_ref, "none")
    tokenizer = load_tokenizer(model_ref, params.finetune.chat_template)
    out = {}
    peft_model = None
    for unit in units:
        seed = int(fingerprint([params.seed, task, unit["volume"]])[:6], 16)
        desc = f"infer {task} · {short_name(model_ref)} · volume {unit['volume']}"
        if unit["volume"] == 0:
            model = peft_model if peft_model is not None else base
            if peft_model is not None:
                with peft_model.disable_adapter():
                    out[0] = _answer_transformers(model, tokenizer, prompts, params, seed, desc)
            else:
                out[0] = _answer_transformers(model, tokenizer, prompts, params, seed, desc)
            continue
        name = f"v{unit['volume']}"
        adapter_dir = str(run_dir / unit["adapter"])
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name)
        else:
            peft_model.load_adapter(adapter_dir, adapter_name=name)
        peft_model.set_adapter(name)
        peft_model.eval()
        out[unit["volume"]] = _answer_transformers(peft_model, tokenizer, prompts, params, seed, desc)
    if peft_model is not None:
        peft_model.unload()  # give the cached base model back without LoRA layers
    return out


def load_responses(run_dir: Path | str) -> pd.DataFrame:
    """The answers of the current grid: the files infer's DONE.json lists (never a file it did not make)."""
    done = read_done(run_dir, "infer") or {}
    rows = []
    for name in done.get("outputs", []):
        path = stage_dir(run_dir, "infer") / name
        if path.exists():
            rows += read_jsonl(path)
    return pd.DataFrame(rows)
