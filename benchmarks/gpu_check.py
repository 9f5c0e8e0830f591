"""The CUDA paths in one short run with nothing downloaded: a tiny Llama built from a config (random weights,
the packaged SmolLM2 tokenizer and chat template) trained and answered through the workbench's own code.

Steps: LoRA through TRL (bf16 on CUDA), QLoRA (4-bit NF4) when bitsandbytes is importable, the adapter saved
and loaded back (same logits), K answers with transformers, and with vLLM when it is importable (one engine,
the adapter as a LoRARequest). Prints tokens/s and peak GPU memory per step and writes them, with what they
were made from, to `--out` (JSON). Without a CUDA GPU the CUDA steps are skipped with a line that says so and
the rest runs small, on the CPU.

    .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.json] [--steps 40] [--k 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.core.models import generate_chat, load_model, load_tokenizer, process_device
from llamaduo_nb.core.params import BUNDLED_COVERAGE, PROJECT_ROOT
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.core.units import _git_commit, _versions

# a ~25M-parameter Llama on a GPU (large enough to time, small enough for minutes); a ~1M one on a CPU
SIZES = {
    "cuda": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def tiny_llama(folder: Path, device_type: str, seed: int) -> dict:
    """Save a randomly initialised Llama and the packaged tokenizer (with its chat template) into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         **SIZES[device_type])
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), **SIZES[device_type]}


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def timed(name: str, results: dict, fn):
    """Run one step: `fn()` gives (numbers to record, an object later steps use); prints and records the numbers
    with the time, tokens/s and the peak GPU memory of the step."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    numbers, made = fn()
    seconds = time.perf_counter() - began
    record = {"seconds": round(seconds, 2), "peak_gpu_memory_gib": peak_memory_gib(), **numbers}
    if record.get("tokens"):
        record["tokens_per_s"] = round(record["tokens"] / seconds, 1)
    results[name] = record
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in record.items()), flush=True)
    return made


def train(params, model_ref: str, quantization: str, pairs: list[dict], folder: Path):
    """One adapter through the workbench's training path (finetune.train_unit's pieces: base, SFTConfig, LoRA)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from llamaduo_nb.core.models import load_training_base
    from llamaduo_nb.stages.finetune import lora_config, sft_config, to_prompt_completion

    cfg = params.finetune
    model = load_training_base(model_ref, quantization)
    args = sft_config(cfg, folder / "checkpoints", params.seed, len(pairs))
    args.save_strategy = "no"
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(to_prompt_completion(pairs)),
                         processing_class=load_tokenizer(model_ref), peft_config=lora_config(cfg))
    result = trainer.train()
    trainer.model.save_pretrained(folder / "adapter")
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    seen = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens = sum(lengths[i % len(lengths)] for i in range(seen))  # the examples the steps went through, in order
    return {"steps": trainer.state.global_step, "train_loss": round(float(result.training_loss), 4), "dtype": str(model.dtype),
            "device": str(next(trainer.model.parameters()).device), "tokens": tokens}, trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    device = process_device()
    cuda = device.type == "cuda"
    steps, prompts_n, new_tokens = (args.steps, args.prompts, args.max_new_tokens) if cuda else (3, 4, 16)
    results: dict = {"made_from": {"script": "benchmarks/gpu_check.py", "git_commit": _git_commit(), "versions": _versions(),
                                   "python": platform.python_version(), "device": str(device),
                                   "gpu": torch.cuda.get_device_name(0) if cuda else None, "coverage": str(BUNDLED_COVERAGE.name),
                                   "steps": steps, "k": args.k, "prompts": prompts_n, "max_new_tokens": new_tokens}}
    if not cuda:
        print("no CUDA GPU: bf16 LoRA, QLoRA and vLLM are skipped; LoRA (float32), adapter save/load and transformers answers run small on the CPU")
    rows = read_jsonl(BUNDLED_COVERAGE)
    pairs = [{"id": str(i), "instruction": r["prompt"], "response": r["messages"][-1]["content"]} for i, r in enumerate(rows)][: 8 * steps]
    test = [r["prompt"] for r in rows][-prompts_n:]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-llama"
        results["model"] = tiny_llama(folder, device.type, seed=0)
        print(f"model: tiny Llama from a config, {results['model']['parameters']:,} parameters, random weights", flush=True)
        overrides = [f"finetune.base_models=[{folder}]", "finetune.quantization=none", f"finetune.max_steps={steps}",
                     "finetune.per_device_train_batch_size=8", "finetune.gradient_accumulation_steps=1", "finetune.max_length=256",
                     "finetune.lora.r=16", "finetune.lora.alpha=32", f"infer.k={args.k}", f"infer.max_new_tokens={new_tokens}",
                     f"infer.batch_size={prompts_n}", "seed=0"]
        params = load_params(PROJECT_ROOT / "params" / "quickstart.yaml", overrides)
        model_ref = str(folder)

        trainer = timed("lora_bf16" if cuda else "lora_float32_cpu", results, lambda: train(params, model_ref, "none", pairs, Path(tmp) / "lora"))
        if cuda and importlib.util.find_spec("bitsandbytes"):
            timed("qlora_nf4", results, lambda: train(params, model_ref, "nf4", pairs, Path(tmp) / "qlora"))
        else:
            print("qlora_nf4: skipped (" + ("no CUDA GPU" if not cuda else "bitsandbytes not importable") + ")")

        def save_and_load() -> dict:
            from peft import PeftModel

            conv = [({"role": "user", "content": test[0]},)]
            tok = load_tokenizer(model_ref)
            ids = tok(tok.apply_chat_template(list(conv[0]), tokenize=False, add_generation_prompt=True), return_tensors="pt",
                      add_special_tokens=False).to(device)
            trained = trainer.model.eval()
            with torch.no_grad():
                expected = trained(**ids).logits.float()
                loaded = PeftModel.from_pretrained(load_model.__wrapped__(model_ref, "none"), str(Path(tmp) / "lora" / "adapter")).eval()
                got = loaded(**ids).logits.float()
            return {"max_abs_logit_difference": float((expected - got).abs().max())}, loaded

        loaded = timed("adapter_save_load", results, save_and_load)

        def answer_transformers() -> dict:
            conversations = [({"role": "user", "content": t},) for t in test]
            gens = generate_chat(loaded, load_tokenizer(model_ref), conversations, max_new_tokens=new_tokens, temperature=0.7, top_p=0.9,
                                 num_return_sequences=args.k, seed=0)
            return {"answers": sum(len(g) for g in gens), "tokens": sum(x.output_tokens for g in gens for x in g)}, None

        timed("answers_transformers", results, answer_transformers)
        if cuda and importlib.util.find_spec("vllm"):
            def answer_vllm() -> dict:
                from llamaduo_nb.stages.infer import VllmEngine

                engine = VllmEngine(params, model_ref)
                try:
                    prompts = [{"prompt_id": str(i), "instruction": t} for i, t in enumerate(test)]
                    cells = [{"volume": 0, "adapter": None}, {"volume": 1, "adapter": str(Path(tmp) / "lora" / "adapter")}]
                    answers = engine.answer(Path("/"), "check", cells, prompts)
                finally:
                    engine.close()
                rows_ = [r for v in answers.values() for r in v]
                return {"answers": len(rows_), "tokens": sum(r["output_tokens"] for r in rows_)}, None

            timed("answers_vllm", results, answer_vllm)
        else:
            print("answers_vllm: skipped (" + ("no CUDA GPU" if not cuda else "vllm not importable") + ")")
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
