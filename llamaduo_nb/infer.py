"""Stage 5 · infer: every fine-tuned model answers every test prompt K times.

Reads: `coverage/test.jsonl`, `models/runs.csv` and the adapters. Writes:
`responses/<task>/<model>/<volume>.jsonl` (prompt_id, volume, k, response, tokens, latency),
`responses/summary.csv`, DONE.json. Volume 0 is the base model without an adapter, the
baseline every volume is compared with. `infer.engine` picks transformers (default),
vLLM's offline engine (CUDA) or any OpenAI-compatible server.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from .progress import tqdm

from . import coverage, finetune
from .errors import UserError
from .io import fingerprint, read_jsonl, write_csv, write_jsonl
from .models import generate_chat, load_model, load_tokenizer, short_name
from .params import Params
from .stage import StageResult, StageRun, cycle_folder, cycle_of, stage_dir


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

    from .models import resolve

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


def run(params: Params, run_dir: Path | str, force: bool = False) -> StageResult:
    stage = StageRun("infer", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
    _check_engine(params)
    stage.begin()
    test = coverage.load(run_dir, "test")
    runs = finetune.load_runs(run_dir)
    summary = []
    for task in params.tasks:
        prompts = [p for p in test if p["task"] == task]
        for model_ref in params.finetune.base_models:
            model_name = short_name(model_ref)
            adapters = runs[(runs.task == task) & (runs.local_model == model_name)].sort_values("volume")
            units = [{"volume": 0, "adapter": None}] + [{"volume": int(r.volume), "adapter": r.adapter} for r in adapters.itertuples()]
            todo = [u for u in units if not unit_path(run_dir, task, model_name, u["volume"]).exists() or force]
            if cycle_of(run_dir) > 1 and any(u["volume"] == 0 for u in todo):
                base_answers = unit_path(cycle_folder(run_dir, 1), task, model_name, 0)
                if base_answers.exists():  # the base model is the same in every cycle: reuse cycle 1's answers
                    write_jsonl(unit_path(run_dir, task, model_name, 0), read_jsonl(base_answers))
                    todo = [u for u in todo if u["volume"] != 0]
            answers: dict = {}
            if todo and params.infer.engine == "vllm":
                answers = _answer_vllm(params, Path(run_dir), task, model_ref, todo, prompts)
            elif todo and params.infer.engine == "openai":
                answers = {u["volume"]: _answer_openai(params, task, model_name, u["volume"], prompts) for u in todo}
            elif todo:
                answers = _answer_all_volumes(params, Path(run_dir), task, model_ref, todo, prompts)
            for unit in units:
                path = unit_path(run_dir, task, model_name, unit["volume"])
                if unit["volume"] in answers:
                    rows = [dict(r, task=task, local_model=model_name, volume=unit["volume"]) for r in answers[unit["volume"]]]
                    write_jsonl(path, rows)  # one file per volume: a crash loses at most the volume in progress
                rows = read_jsonl(path)
                summary.append({"task": task, "local_model": model_name, "volume": unit["volume"], "answers": len(rows),
                                "mean_output_tokens": round(sum(r["output_tokens"] or 0 for r in rows) / max(1, len(rows)), 1),
                                "truncated": sum(r["finish_reason"] == "length" for r in rows),
                                "mean_latency_s": round(sum(r["latency_s"] for r in rows) / max(1, len(rows)), 3)})
    frame = pd.DataFrame(summary)
    write_csv(stage_dir(run_dir, "infer") / "summary.csv", frame)
    return stage.finish({"units": len(summary), "answers": int(frame["answers"].sum()) if len(frame) else 0})


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
    rows = []
    for path in sorted(stage_dir(run_dir, "infer").glob("*/*/*.jsonl")):
        rows += read_jsonl(path)
    return pd.DataFrame(rows)
