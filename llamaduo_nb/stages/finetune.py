"""Stage 4 · finetune: LoRA (QLoRA on CUDA) with TRL's SFTTrainer, one adapter per volume.

Reads: `deduplicate/kept.jsonl` (and every earlier cycle's). Writes, per (task, base model, volume):
`finetune/<task>/<model>/<volume>/` (LoRA adapter, tokenizer, `train_log.csv`, `UNIT.json`), and
`finetune/runs.csv`, DONE.json. Volumes are nested: each is the first `volume` of the task's kept pairs in
the order the service LLM wrote them (`training_order`), so larger volumes contain smaller ones, and a volume's
pairs stay the same when synthesis later grows (the volume search adds data as it goes). In a later cycle
(`cycle-<t>/`) one adapter per (task, model) is trained on every pair kept so far, its volume
being their number.

Units: one adapter per (task, model, volume), made from the training settings (`finetune.*` but
the grid lists), the base model, the seed and the content of the pairs it trains on. An adapter
whose unit is current is reused; any other is retrained (an interrupted one resumes from its last
complete checkpoint when its fingerprint is the same). Adapters of cells no longer in the grid are
moved to `orphaned/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.io import fingerprint, read_json, write_csv, write_json
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.models import load_tokenizer, load_training_base, model_identity, short_name
from llamaduo_nb.core.execution import UnitJob, run_units
from llamaduo_nb.core.params import FinetuneParams, Params
from llamaduo_nb.core.units import Stage, StageResult, StageRun, Unit, cycle_of, earlier_cycles, set_aside, stage_dir
from llamaduo_nb.stages.deduplicate import kept_before, load_kept


SYNTHESIS_ID = re.compile(r"-c(\d+)-(\d+)-(\d+)$")  # <task>-c<cycle>-<call>-<j>, as synthesize names a pair


def synthesis_position(pair: dict) -> tuple:
    """(cycle, call, j) of a synthesised pair; other ids sort after them, by id."""
    match = SYNTHESIS_ID.search(str(pair["id"]))
    return (0, int(match[1]), int(match[2]), int(match[3]), "") if match else (1, 0, 0, 0, str(pair["id"]))


def training_order(pairs: list[dict]) -> list[dict]:
    """A task's pairs in the order they were written (cycle, call, item); every volume takes a prefix of it.

    Not a shuffle: call i's seed pair is drawn at random (synthesize.request_for), so any prefix is already a random
    sample of the seeds, and a prefix is stable when more calls are added and deduplicated after it (deduplication
    is a greedy pass in the same order). The trainer shuffles the examples within a volume."""
    return sorted(pairs, key=synthesis_position)


def select_volume(order: list[dict], volume: int) -> list[dict]:
    return order[:volume]


def to_prompt_completion(pairs: list[dict]) -> list[dict]:
    """Conversational prompt-completion rows: TRL then computes the loss on the assistant turn only."""
    return [
        {"prompt": [{"role": "user", "content": p["instruction"]}], "completion": [{"role": "assistant", "content": p["response"]}]}
        for p in pairs
    ]


def unit_dir(run_dir: Path | str, task: str, model_ref: str, volume: int) -> Path:
    return stage_dir(run_dir, "finetune") / task / short_name(model_ref) / str(volume)


def sft_config(cfg: FinetuneParams, output_dir: Path, seed: int, n_examples: int, report_to: list[str] = (), run_name: str | None = None):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    steps_per_epoch = max(1, -(-n_examples // (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)))
    total = cfg.max_steps if cfg.max_steps > 0 else int(steps_per_epoch * cfg.num_train_epochs)
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        **_warmup(cfg.warmup_ratio),
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        max_length=cfg.max_length,
        completion_only_loss=True,  # loss on the assistant turn only, as in the paper
        packing=False,
        seed=seed,
        data_seed=seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=max(1, total // 4),  # a few checkpoints so an interrupted run resumes
        save_total_limit=1,
        report_to=list(report_to),  # tracking.report_to: the trackers that draw the loss curve live (none by default)
        run_name=run_name,
        bf16=cuda,
        use_cpu=not cuda,
        **_checkpointing(cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda),
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint the trainer finished writing (trainer_state.json is written last, in place: a kill
    while it is written leaves it empty or cut); one cut short by a kill is removed, so the resume starts from
    the one before it."""
    if not folder.exists():
        return None
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for checkpoint in reversed(found):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return checkpoint
        except (OSError, ValueError):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def _checkpointing(on: bool) -> dict:
    """Recompute activations in the backward pass: saves GPU memory, costs time. TRL turns it on by
    default; transformers ≥ 5 calls it activation_checkpointing."""
    import dataclasses

    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    return {"activation_checkpointing": on} if "activation_checkpointing" in names else {"gradient_checkpointing": on}


def _warmup(ratio: float) -> dict:
    """transformers 5 takes the ratio as a float `warmup_steps`; older versions call it `warmup_ratio`."""
    import dataclasses

    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}


def lora_config(cfg: FinetuneParams):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM", bias="none",
    )


def effective_quantization(cfg: FinetuneParams, warn: bool = True) -> str:
    import torch

    if cfg.quantization == "nf4" and not torch.cuda.is_available():
        if warn:
                warnings.warn("finetune.quantization is nf4 (QLoRA) but no CUDA GPU is present: training plain LoRA in float32 instead")
        return "none"
    return cfg.quantization


def pairs_fingerprint(pairs: list[dict]) -> str:
    """The content of a training set: ids, instructions and responses, in training order."""
    return fingerprint([[p["id"], p["instruction"], p["response"]] for p in pairs])


def adapter_unit(params: Params, run_dir: Path | str, task: str, model_ref: str, volume: int, pairs: list[dict]) -> Unit:
    cfg = params.finetune
    made_from = {
        "finetune": cfg.model_dump(mode="json", exclude={"volumes", "base_models", "search", "volumes_by_task"}),
        "quantization": effective_quantization(cfg, warn=False), "base_model": model_identity(model_ref), "seed": params.seed,
        "pairs": pairs_fingerprint(pairs), "n_train": len(pairs),
    }
    out = unit_dir(run_dir, task, model_ref, volume)
    # the weights and their config are what later stages read: their content is the adapter's fingerprint
    return Unit([out / name for name in ADAPTER_FILES], out / "UNIT.json", made_from)


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TENSORBOARD_DIR = "tensorboard"  # tracking.report_to: tensorboard writes <run>/tensorboard/<task>/<model>/<volume>/


def tensorboard_dir(run_dir: Path | str, task: str, model_ref: str, volume: int) -> Path:
    """Beside the stage folders, not in the adapter's folder: event files are logs, never part of an adapter."""
    return Path(run_dir) / TENSORBOARD_DIR / task / short_name(model_ref) / str(volume)


@contextlib.contextmanager
def tensorboard_folder(folder: Path | None):
    """transformers' TensorBoard callback reads its folder from TENSORBOARD_LOGGING_DIR when the trainer is built
    (its default, inside the checkpoints, is deleted with them); set for this adapter only."""
    if folder is None:
        yield
        return
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before


def train_unit(params: Params, run_dir: Path | str, task: str, model_ref: str, volume: int, pairs: list[dict], callbacks=None,
               force: bool = False) -> dict:
    """Train one adapter, or return the record of the current one."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    cfg = params.finetune
    unit = adapter_unit(params, run_dir, task, model_ref, volume, pairs)
    out = unit.record_path.parent
    record = unit.current(force)
    if record:
        return dict(record, skipped=True)
    checkpoints = out / "checkpoints"
    previous = unit.record() or (read_json(out / ".training.json") if (out / ".training.json").exists() else {})
    unit.discard()
    if out.exists() and (force or previous.get("fingerprint") != unit.fingerprint):
        shutil.rmtree(out)  # params or data changed (or a forced redo): nothing of the old adapter is reused
    out.mkdir(parents=True, exist_ok=True)
    # lets a killed run resume its checkpoints, and says which process trains the adapter
    write_json(out / ".training.json", {"fingerprint": unit.fingerprint, "pid": os.getpid()})
    quant = effective_quantization(cfg)
    tokenizer = load_tokenizer(model_ref, cfg.chat_template)
    model = load_training_base(model_ref, quant)
    args = sft_config(cfg, checkpoints, params.seed, len(pairs), params.tracking.report_to, f"{task}/{short_name(model_ref)}/{volume}")
    # LoRA's initial weights are drawn when the trainer wraps the model, before it seeds anything: seeded here,
    # an adapter is the same whatever this process trained before (a Ray worker, an --only redo)
    set_seed(params.seed)
    board = tensorboard_dir(run_dir, task, model_ref, volume) if "tensorboard" in params.tracking.report_to else None
    with tensorboard_folder(board):  # read when the trainer is built
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(to_prompt_completion(pairs)),
            processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=callbacks,
        )
    resume = last_complete_checkpoint(checkpoints)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finished = time.time()
    seconds = round(finished - started, 2)
    if not trainer.is_world_process_zero():
        return {"task": task, "volume": volume, "skipped": False, "n_train": len(pairs)}  # rank 0 writes the outputs
    log = pd.DataFrame([h for h in trainer.state.log_history if "loss" in h])
    if not log.empty:
        log = log[[c for c in ("step", "epoch", "loss", "learning_rate", "grad_norm") if c in log]]
    write_csv(out / "train_log.csv", log)
    trainer.model.save_pretrained(out, save_embedding_layers=False)  # the adapter only (a few MB), before UNIT.json
    tokenizer.save_pretrained(out)
    shutil.rmtree(checkpoints, ignore_errors=True)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    record = unit.commit(
        task=task, local_model=short_name(model_ref), base_model=model_ref, volume=volume, n_train=len(pairs),
        steps=trainer.state.global_step, train_loss=round(float(result.training_loss), 4), seconds=seconds,
        quantization=quant, trainable_params=int(trainable), resumed=str(resume) if resume else None,
        adapter=str(out.relative_to(Path(run_dir))), training_started=round(started, 3), training_finished=round(finished, 3),
    )
    (out / ".training.json").unlink(missing_ok=True)
    del trainer, model
    return dict(record, skipped=False)


def grid(params: Params, run_dir: Path | str, kept: list[dict]) -> list[tuple[str, str, int, list[dict]]]:
    """(task, model, volume, pairs) of every adapter the current params ask for."""
    later_cycle = cycle_of(run_dir) > 1
    cells = []
    for task in params.tasks:
        order = training_order([p for p in kept if p["task"] == task])
        # cycle 1 sweeps the volumes (those the search has reached); a later cycle trains once on every pair kept so far
        volumes = [len(order)] if later_cycle else params.finetune.volumes_for(task)
        for model_ref in params.finetune.base_models:
            for volume in volumes:
                pairs = select_volume(order, volume)
                if pairs:
                    cells.append((task, model_ref, volume, pairs))
    return cells


def _reads(params: Params, run_dir: Path) -> dict:
    # every earlier cycle's kept pairs (a later cycle trains on them too) and what the base models are now
    return {"earlier_cycles": earlier_cycles(run_dir, "deduplicate"),
            "base_models": [model_identity(ref) for ref in params.finetune.base_models]}


STAGE = Stage("finetune", upstream=("deduplicate",), depends_on=("seed", "tasks", "finetune"), reads=_reads)
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    stage.begin()

    cells = grid(params, run_dir, kept_before(run_dir) + load_kept(run_dir))
    wanted = {unit_dir(run_dir, task, model_ref, volume) for task, model_ref, volume, _ in cells}
    folder = stage_dir(run_dir, "finetune")
    present = {p.parent for p in folder.glob("*/*/*/UNIT.json")} | {p.parent for p in folder.glob("*/*/*/.training.json")}
    set_aside(run_dir, "finetune", sorted(present - wanted), "task, local model or volume dropped from the params")
    if params.execution.backend == "ray" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("execution.backend: ray schedules whole units; run `accelerate launch` with execution.backend: local")
    jobs = [UnitJob(f"{task}/{short_name(model_ref)}/{volume}", train_unit, (params, run_dir, task, model_ref, volume, pairs),
                    {"force": force}) for task, model_ref, volume, pairs in cells]
    records = run_units("finetune", folder, jobs, params.execution, log=lambda line: print(line, flush=True))
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, only the main process writes
        return StageResult("finetune", Path(run_dir), False, counts={"adapters": len(records)})
    columns = ["task", "local_model", "base_model", "volume", "n_train", "steps", "train_loss", "seconds", "quantization",
               "trainable_params", "resumed", "adapter", "fingerprint", "content", "skipped"]
    table = pd.DataFrame(records).reindex(columns=columns)
    write_csv(folder / "runs.csv", table)
    trained = [f"{r['task']}/{r['local_model']}/{r['volume']}" for r in records if not r["skipped"]]
    # the adapters' weights are the stage's content (runs.csv holds timings, which change on every training)
    outputs = [str(Path(r["adapter"]).relative_to(folder.relative_to(Path(run_dir))) / name) for r in records for name in ADAPTER_FILES]
    short = short_volumes(table)
    for line in short:
        print(f"WARNING finetune {line}", flush=True)
    return stage.finish({
        "adapters": len(records), "trained": len(trained), "reused": len(records) - len(trained), "short_volumes": len(short),
    }, outputs=outputs, units={"redone": trained}, extra={"warnings": short} if short else None)


def short_volumes(runs: pd.DataFrame) -> list[str]:
    """One line per adapter trained on fewer pairs than its volume's label (deduplication kept too few): its real size,
    and which labels share the same data, so that no figure's two volumes are silently one."""
    lines = []
    for row in runs[runs["n_train"] < runs["volume"]].itertuples():
        same = runs[(runs.task == row.task) & (runs.local_model == row.local_model) & (runs.n_train == row.n_train)
                    & (runs.volume != row.volume)]["volume"].tolist()
        lines.append(f"{row.task} · {row.local_model}: volume {row.volume} trained on {row.n_train} pairs, short of its label"
                     + (f" (the same data as volume {', '.join(str(v) for v in same)})" if same else "")
                     + "; synthesize more (synthesize.samples_per_task) or drop the volume")
    return lines


def load_runs(run_dir: Path | str) -> pd.DataFrame:
    return pd.read_csv(stage_dir(run_dir, "finetune") / "runs.csv")


def load_train_logs(run_dir: Path | str) -> pd.DataFrame:
    frames = []
    for path in sorted(stage_dir(run_dir, "finetune").glob("*/*/*/train_log.csv")):
        task, model, volume = path.parts[-4], path.parts[-3], int(path.parts[-2])
        try:
            log = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        frames.append(log.assign(task=task, local_model=model, volume=volume))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
