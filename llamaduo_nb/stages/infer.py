"""Stage 5 · infer: every fine-tuned model answers every test prompt K times.

Reads: `coverage/test.jsonl`, `finetune/runs.csv` and the adapters. Writes:
`infer/<task>/<model>/<volume>.jsonl` (prompt_id, volume, k, response, tokens, latency) with its
unit record `<volume>.jsonl.unit.json`, `infer/summary.csv`, DONE.json. Volume 0 is the base model
without an adapter, the baseline every volume is compared with. `infer.engine` picks transformers
(default), vLLM's offline engine (CUDA) or any OpenAI-compatible server (`infer.base_url`) that lists
each cell's model name (`served_name`) in GET /v1/models; a server that does not is refused, because
it would answer with another model.

Units: one answer file per (task, model, volume), made from `infer.*` (K, sampling, batch size:
the generation seed is per batch), the seed, the base model and chat template, the task's test
prompts and the content of the adapter's weights. Only files whose unit is not current are
answered again; files of cells no longer in the grid are moved to `orphaned/`.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

import pandas as pd
from llamaduo_nb.core.progress import tqdm

from llamaduo_nb.stages import coverage

from llamaduo_nb.stages import finetune
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import fingerprint, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.core.models import chat_texts, generate_chat, load_model, load_tokenizer, model_identity, short_name
from llamaduo_nb.core.execution import UnitJob, run_units
from llamaduo_nb.core.params import Params, vllm_max_lora_rank
from llamaduo_nb.core.units import Stage, StageResult, StageRun, Unit, cycle_folder, cycle_of, read_done, set_aside, stage_dir
from llamaduo_nb.core.models import PACKAGED_MODELS, resolve
from llamaduo_nb.core.params import VLLM_MAX_LORA_RANKS
from llamaduo_nb.llm.served import server_config
from llamaduo_nb.llm.served import check_served, honours_n
from llamaduo_nb.llm import cache_for
from llamaduo_nb.llm.served import answer


# how answers are fetched from a server, not what they are
INFER_OPERATIONAL = {"api_key_env", "max_concurrency"}


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
    if engine == "vllm" and params.execution.backend == "local":  # on Ray, the workers need vLLM and a GPU, not this process
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise UserError("infer.engine: vllm needs the vllm package and a CUDA GPU (pip install vllm); use engine: transformers on a CPU")
    if engine == "openai" and not params.infer.base_url:
        raise UserError("infer.engine: openai needs infer.base_url (an OpenAI-compatible server serving the adapters)")


def vllm_engine_args(params: Params, model_ref: str) -> dict:
    """vLLM `LLM(...)` arguments for one base model: LoRA on, the smallest `max_lora_rank` vLLM accepts that
    holds finetune.lora.r, the run's seed."""

    src = resolve(model_ref)
    args = {"model": str(Path(src.location) / src.gguf_file) if src.gguf_file else src.location, "enable_lora": True,
            "max_lora_rank": vllm_max_lora_rank(params.finetune.lora.r, _vllm_ranks()), "max_loras": 1, "seed": params.seed}
    if src.gguf_file and model_ref in PACKAGED_MODELS:
        args["tokenizer"] = PACKAGED_MODELS[model_ref]["hub"]  # vLLM reads a GGUF's tokenizer from its Hub model
    share = params.execution.gpus_per_unit
    if params.execution.backend == "ray" and share is not None and 0 < share < 1:
        args["gpu_memory_utilization"] = round(0.9 * share, 3)  # units sharing a GPU: each engine takes its share
    return args


def _vllm_ranks() -> tuple[int, ...]:
    """The ranks the installed vLLM accepts for max_lora_rank (its MaxLoRARanks), else those of the schema."""
    import typing


    try:
        from vllm.config.lora import MaxLoRARanks

        return tuple(typing.get_args(MaxLoRARanks)) or VLLM_MAX_LORA_RANKS
    except (ImportError, AttributeError):
        return VLLM_MAX_LORA_RANKS


def vllm_sampling_args(params: Params, seed: int) -> dict:
    """vLLM `SamplingParams(...)` for one batch: K answers and the sampling transformers uses (temperature 0: greedy)."""
    cfg = params.infer
    greedy = cfg.temperature == 0
    return {"n": cfg.k, "temperature": cfg.temperature, "top_p": 1.0 if greedy else cfg.top_p, "max_tokens": cfg.max_new_tokens,
            "seed": seed}


class VllmEngine:
    """vLLM's offline engine for one base model, reused for all its tasks and volumes (one LoRARequest per
    adapter, ids unique for the engine's life) and torn down by `close()` so the next base model has the GPU."""

    def __init__(self, params: Params, model_ref: str):
        from vllm import LLM

        self.params = params
        # the run's chat template: prompts are rendered by the same tokenizer as with transformers, passed as token ids
        self.tokenizer = load_tokenizer(model_ref, params.finetune.chat_template)
        self.llm = LLM(**vllm_engine_args(params, model_ref))
        self.adapters = 0

    def answer(self, run_dir: Path, task: str, cells: list[dict], prompts: list[dict]) -> dict:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        cfg = self.params.infer
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in chat_texts(self.tokenizer, _conversations(prompts))]
        out = {}
        for cell in cells:
            lora = None
            if cell["volume"]:
                self.adapters += 1
                lora = LoRARequest(f"{task}-v{cell['volume']}", self.adapters, str(Path(run_dir) / cell["adapter"]))
            seed = volume_seed(self.params, task, cell["volume"])
            sampling = [SamplingParams(**vllm_sampling_args(self.params, seed + (i // cfg.batch_size) * cfg.batch_size))
                        for i in range(len(prompts))]
            began = time.time()
            results = self.llm.generate([{"prompt_token_ids": p} for p in ids], sampling, lora_request=lora)
            latency = (time.time() - began) / max(1, len(prompts))
            rows = []
            for prompt, res in zip(prompts, results):
                for k, o in enumerate(res.outputs):
                    rows.append({"prompt_id": prompt["prompt_id"], "k": k, "response": o.text.strip(), "output_tokens": len(o.token_ids),
                                 "input_tokens": len(res.prompt_token_ids), "finish_reason": o.finish_reason, "latency_s": round(latency, 3)})
            out[cell["volume"]] = rows
        return out

    def close(self) -> None:
        del self.llm
        gc.collect()
        try:
            from vllm.distributed import cleanup_dist_env_and_memory
        except ImportError:
            import torch

            torch.cuda.empty_cache()
        else:
            cleanup_dist_env_and_memory()


def served_name(model_name: str, task: str, volume: int) -> str:
    """The model name a server must list for a cell: the base model's short name, an adapter's `<model>-<task>-<volume>`."""
    return model_name if volume == 0 else f"{model_name}-{task}-{volume}"


def volume_seed(params: Params, task: str, volume: int) -> int:
    """The generation seed of one answer file (each batch of prompts adds its offset), the same on every engine."""
    return int(fingerprint([params.seed, task, volume])[:6], 16)


class _Server:
    """infer.engine: openai — the server checked once per stage: that it serves every cell's name, and whether it honours n."""

    def __init__(self, params: Params):
        self.params = params
        self.use_n: Optional[bool] = None

    def config(self, name: str):
        cfg = self.params.infer
        return server_config(cfg.base_url, name, cfg.api_key_env, cfg.max_concurrency)

    def check(self, names: list[str]) -> None:
        check_served(self.config(names[0]), sorted(set(names)))
        cfg = self.params.infer
        if self.use_n is None:
            self.use_n = cfg.k > 1 and honours_n(self.config(names[0]))
            print(f"infer: {cfg.base_url} " + ("returns K answers per request (n)" if self.use_n
                                                 else f"ignores n: {cfg.k} seeded requests per prompt"), flush=True)

    def answer_cells(self, run_dir: Path, task: str, model_name: str, cells: list[dict], prompts: list[dict]) -> dict:
        cfg = self.params.infer
        names = {c["volume"]: served_name(model_name, task, c["volume"]) for c in cells}
        return {c["volume"]: answer(self.config(names[c["volume"]]), cache_for(run_dir), prompts, cfg.k, cfg.temperature, cfg.top_p,
                                    cfg.max_new_tokens, volume_seed(self.params, task, c["volume"]), self.use_n,
                                    desc=f"infer {task} · {names[c['volume']]}", weights=c["weights"])
                for c in cells}


def answer_unit(params: Params, run_dir: Path | str, task: str, model_ref: str, volume: int, prompts: list[dict],
                adapter_content: str | None) -> Unit:
    made_from = {
        "infer": params.infer.model_dump(mode="json", exclude=INFER_OPERATIONAL), "seed": params.seed, "base_model": model_identity(model_ref),
        "chat_template": params.finetune.chat_template, "volume": volume, "adapter": adapter_content,
        "prompts": coverage.prompts_fingerprint(prompts),
    }
    return Unit.file(unit_path(run_dir, task, short_name(model_ref), volume), made_from)


def _reads(params: Params, run_dir: Path) -> dict:
    return {"base_models": [model_identity(ref) for ref in params.finetune.base_models]}


STAGE = Stage("infer", upstream=("coverage", "finetune"),
              depends_on=("seed", "tasks", "finetune.base_models", "finetune.chat_template", "infer"), reads=_reads)
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    _check_engine(params)
    stage.begin()
    test = coverage.load(run_dir, "test")
    runs = finetune.load_runs(run_dir)
    summary, outputs, planned = [], [], []
    wanted = set()
    work: dict[str, list] = {}  # base model → (task, cells to answer, prompts): one engine per base model
    for task in params.tasks:
        prompts = [p for p in test if p["task"] == task]
        for model_ref in params.finetune.base_models:
            model_name = short_name(model_ref)
            adapters = runs[(runs.task == task) & (runs.local_model == model_name)].sort_values("volume")
            # `weights`: what a server must be serving under the cell's name (the base model's identity, an adapter's content)
            cells = [{"volume": 0, "adapter": None, "content": None, "weights": fingerprint(model_identity(model_ref))}]
            cells += [{"volume": int(r.volume), "adapter": r.adapter, "content": r.content, "weights": r.content}
                      for r in adapters.itertuples()]
            units = {c["volume"]: answer_unit(params, run_dir, task, model_ref, c["volume"], prompts, c["content"]) for c in cells}
            wanted |= {u.outputs[0] for u in units.values()}
            todo = [c for c in cells if not units[c["volume"]].current(force)]
            if cycle_of(run_dir) > 1 and any(c["volume"] == 0 for c in todo) and _reuse_base_answers(params, run_dir, units[0], force):
                todo = [c for c in todo if c["volume"] != 0]  # the base model is the same in every cycle
            for c in todo:
                units[c["volume"]].discard()
            planned.append((task, model_name, cells, units))
            if todo:
                work.setdefault(model_ref, []).append((task, [dict(c, unit=units[c["volume"]]) for c in todo], prompts))
    jobs = [UnitJob(short_name(model_ref), answer_base_model, (params, Path(run_dir), model_ref, items)) for model_ref, items in work.items()]
    redone = [key for keys in run_units("infer", stage_dir(run_dir, "infer"), jobs, params.execution, log=lambda line: print(line, flush=True))
              for key in keys]
    for task, model_name, cells, units in planned:
        for cell in cells:
            path = units[cell["volume"]].outputs[0]
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


def answer_base_model(params: Params, run_dir: Path, model_ref: str, work: list[tuple[str, list[dict], list[dict]]]) -> list[str]:
    """Answer every due file of one base model, one engine for all its tasks and volumes; each (task, model) is
    written and recorded as soon as it is answered, so a process that dies loses only what it had not written.
    `work`: (task, cells with their `unit`, test prompts). Returns the files answered, as task/model/volume."""
    model_name = short_name(model_ref)
    engine = VllmEngine(params, model_ref) if params.infer.engine == "vllm" else None
    server = _Server(params) if params.infer.engine == "openai" else None
    if server is not None:  # every cell's name checked before the first answer is asked for
        server.check([served_name(model_name, task, c["volume"]) for task, cells, _ in work for c in cells])
    answered = []
    try:
        for task, cells, prompts in work:
            if engine is not None:
                answers = engine.answer(run_dir, task, cells, prompts)
            elif params.infer.engine == "openai":
                answers = server.answer_cells(run_dir, task, model_name, cells, prompts)
            else:
                answers = _answer_all_volumes(params, run_dir, task, model_ref, cells, prompts)
            for cell in cells:
                rows = [dict(r, task=task, local_model=model_name, volume=cell["volume"]) for r in answers[cell["volume"]]]
                write_jsonl(cell["unit"].outputs[0], rows)  # one file per volume
                cell["unit"].commit(task=task, local_model=model_name, volume=cell["volume"], answers=len(rows))
                answered.append(f"{task}/{model_name}/{cell['volume']}")
    finally:
        if engine is not None:
            engine.close()
    return answered


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
        seed = volume_seed(params, task, unit["volume"])
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
