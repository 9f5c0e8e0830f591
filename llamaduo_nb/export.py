"""Turn a fine-tuned adapter into what a team serves: the merged model, a GGUF, an Ollama Modelfile and
the commands that serve them (llama.cpp's server, Ollama, vLLM).

The GGUF is written from the base model's own GGUF: every metadata field (tokenizer, special tokens,
context length) is copied and every tensor is replaced by the merged model's, quantised with the
`gguf` package (the library llama.cpp's converter writes with). llama.cpp's `convert_hf_to_gguf.py`
is not on PyPI and rebuilding the tokenizer from a Hub folder needs the Hub; for a base that is
already a GGUF only the weights change, so copying its metadata is both offline and exact.
Tensors LoRA did not touch are checked to come back equal to the base's (the name mapping and
layout are then known right); the parity check in the deploy stage tests the rest end to end.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Optional

import numpy as np

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.models import load_model, load_tokenizer

#: quantisation types the `gguf` package can write and llama.cpp loads on any CPU
GGUF_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
              "q4_1": "Q4_1", "q4_0": "Q4_0"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q5_1": "MOSTLY_Q5_1",
               "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
# metadata the writer sets itself, or that describes the new tensors rather than the model
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.name",
               "tokenizer.chat_template")


def merge_adapter(model_ref: str, adapter_dir: Path | str, chat_template: Optional[str] = None):
    """(merged model, tokenizer with the chat template the adapter was trained with), in float32.

    A fresh copy of the base is loaded: merging changes its weights in place, and the loaded model is
    shared with inference in this process."""
    from peft import PeftModel


    base = load_model.__wrapped__(model_ref, "none")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged, copy.deepcopy(load_tokenizer(model_ref, chat_template))  # a copy: the caller may set another template


def save_merged(model, tokenizer, folder: Path | str, dtype: str) -> Path:
    """The merged model as safetensors with its tokenizer and chat template (`save_pretrained`)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a cast copy of the weights: the model in memory stays in full precision for the GGUF
    state = {name: tensor.to(getattr(torch, dtype)) for name, tensor in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    model.config.dtype = dtype  # config.json "dtype" (transformers 5 name; "torch_dtype" is deprecated)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _permute_for_llama_cpp(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's `permute`); transformers undoes it on load."""
    heads = n_head_kv if n_head_kv and n_head != n_head_kv else n_head
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _layout_step(arch: str):
    """How an HF tensor becomes the GGUF's, for the base's architecture: llama.cpp permutes q/k rows of
    llama-family models and stores the others as they are. Other transforms (Gemma's norms, fused
    experts) are not inverted here: those architectures are refused rather than exported wrong."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    processor = gguf_utils.TENSOR_PROCESSORS.get(arch, gguf_utils.TensorProcessor)
    if processor is gguf_utils.LlamaTensorProcessor:
        return "llama"
    if processor is gguf_utils.TensorProcessor:
        return "identity"
    raise UserError(f"deploy: writing a GGUF for architecture '{arch}' is not supported; the merged model is in "
                    "safetensors: convert it with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(base_gguf: Path | str, model, target: Path | str, quantization: str, chat_template: str, name: str) -> dict:
    """Write the merged `model` as a GGUF beside the base's metadata. Returns what was written and checked."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if quantization not in GGUF_TYPES:
        raise UserError(f"deploy.quantization: '{quantization}' is not one of {', '.join(GGUF_TYPES)}")
    reader = gguf.GGUFReader(str(base_gguf))
    arch = reader.get_field("general.architecture").contents()
    step = _layout_step(arch)
    config = model.config
    processor = gguf_utils.TENSOR_PROCESSORS.get(arch, gguf_utils.TensorProcessor)(config=config.to_dict())
    to_hf = gguf_utils.get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[quantization])

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in _NOT_COPIED:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quantization]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_chat_template(chat_template)

    largest_untouched_change = 0.0
    for tensor in reader.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None or hf_name not in state:
            raise UserError(f"deploy: the base GGUF's tensor {tensor.name} has no counterpart in the merged model")
        data = state[hf_name].detach().float().cpu().numpy()
        if step == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config.num_attention_heads
            data = _permute_for_llama_cpp(data, heads, heads if ".attn_q." in tensor.name else config.num_key_value_heads)
        base = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(data.shape)
        if not re.search(r"attn_(q|k|v|output)|ffn_(gate|up|down)", tensor.name):  # LoRA's targets change; nothing else may
            largest_untouched_change = max(largest_untouched_change, float(np.abs(base - data).max()))
        if data.ndim == 1 or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            writer.add_tensor(tensor.name, data.astype(np.float32))  # norms stay float32, as llama.cpp keeps them
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor.name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    if largest_untouched_change > 1e-3:
        writer.close()
        partial.unlink(missing_ok=True)
        raise UserError(f"deploy: tensors LoRA did not train differ from the base GGUF's by up to {largest_untouched_change:.3g}; "
                        "the export's tensor layout is wrong for this model, nothing was written")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return {"architecture": arch, "tensors": len(reader.tensors), "quantization": quantization,
            "largest_untouched_change": largest_untouched_change}


# -- serving -------------------------------------------------------------------------------------------------
_CHATML_OLLAMA = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                  '<|im_start|>assistant\n')


def modelfile(gguf_name: str, chat_template: str, temperature: float, top_p: float, max_new_tokens: int) -> str:
    """An Ollama Modelfile for the GGUF. Ollama's templates are Go templates, not Jinja: a ChatML template
    (SmolLM2, Qwen) is written out; for any other, Ollama reads the GGUF's own chat template."""
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in chat_template:
        lines += [f'TEMPLATE """{_CHATML_OLLAMA}"""', 'PARAMETER stop "<|im_end|>"']
    else:
        lines += ["# TEMPLATE: Ollama takes the chat template stored in the GGUF (tokenizer.chat_template)"]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {top_p:g}", f"PARAMETER num_predict {max_new_tokens}", ""]
    return "\n".join(lines)


def serve_commands(name: str, folder: Path | str, gguf_name: Optional[str], base_ref: str, adapter_dir: Path | str,
                   lora_rank: int, hub_id: Optional[str]) -> dict:
    """The commands that serve one exported cell, by server. Paths are absolute: copy and paste."""
    folder = Path(folder).resolve()
    q = shlex.quote
    out = {}
    if gguf_name:
        model = folder / gguf_name
        # --no-repack / `llamaduo serve`: on AMX CPUs (Sapphire Rapids and later) the repacked weights crash the server (llama.cpp #20824)
        out["llama.cpp"] = f"llama-server -m {q(str(model))} --alias {q(name)} --port 8080 --no-repack"
        out["llama-cpp-python"] = f"llamaduo serve {q(str(model))} --alias {q(name)} --port 8080"
        out["ollama"] = f"cd {q(str(folder))} && ollama create {q(name)} -f Modelfile && ollama run {q(name)}"
    out["vllm (merged)"] = f"vllm serve {q(str(folder / 'merged'))} --served-model-name {q(name)} --port 8000"
    base = hub_id or base_ref
    out["vllm (adapter)"] = (f"vllm serve {q(base)} --enable-lora --max-lora-rank {lora_rank} "
                             f"--lora-modules {q(name)}={q(str(Path(adapter_dir).resolve()))} --port 8000")
    out["llamaduo infer"] = ("infer: {engine: openai, base_url: 'http://127.0.0.1:8080/v1'}  "
                             f"# the server must list '{name}' in GET /v1/models")
    return out


def commands_markdown(cells: list[dict]) -> str:
    """deploy/COMMANDS.md: per exported cell, what it is and how to serve it."""
    parts = ["# Serving the exported models", "",
             "The llama.cpp commands turn the weight repack off (`--no-repack`; `llamaduo serve` starts llama-cpp-python's "
             "stock server with the same setting): on Intel CPUs with AMX (Sapphire Rapids and later, e.g. AWS m7i, GCP C3) "
             "the repacked weights crash the server on its first request.", ""]
    for cell in cells:
        parts += [f"## {cell['name']}", "", f"{cell['task']} · {cell['local_model']} · {cell['volume']} training samples "
                  f"(cycle {cell['cycle']}); chosen because {cell['why']}.", ""]
        parts += [f"- {server}: `{command}`" for server, command in cell["commands"].items()]
        parts.append("")
    return "\n".join(parts)


def folder_size(path: Path | str) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def json_dump(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
