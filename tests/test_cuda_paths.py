"""The CUDA paths, pinned without a GPU: CUDA and accelerate's process state are mocked, vLLM is a fake module.

Each rank's model on its own device, one bf16 base per rank, one vLLM engine per base model (torn down before
the next), LoRA ranks vLLM accepts, the run's chat template, and the same generate settings on both engines.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from llamaduo_nb.core import models
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.params import PROJECT_ROOT, vllm_max_lora_rank
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.core.units import Unit
from llamaduo_nb.stages import infer

QUICKSTART = PROJECT_ROOT / "params" / "quickstart.yaml"


def on_device(monkeypatch, device: str) -> None:
    """This process is an accelerate rank whose device is `device` (e.g. cuda:3 for local rank 3)."""
    import accelerate

    state = types.SimpleNamespace(device=torch.device(device))
    monkeypatch.setattr(accelerate, "PartialState", lambda: state)


# -- each rank's model on its own device ----------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_each_rank_loads_its_model_onto_its_own_gpu(monkeypatch, quantization):
    on_device(monkeypatch, "cuda:3")
    kwargs = models.placement(quantization)
    assert kwargs["device_map"] == {"": 3} and kwargs["dtype"] == torch.bfloat16
    assert ("quantization_config" in kwargs) == (quantization == "nf4")


def test_load_model_places_by_device_map_and_never_moves_to_gpu_0(monkeypatch):
    on_device(monkeypatch, "cuda:1")
    loaded = {}

    class FakeModel:
        config = types.SimpleNamespace()

        def to(self, *args, **kwargs):
            raise AssertionError(f"moved after loading: {args}")

        def eval(self):
            return self

    def from_pretrained(location, **kwargs):
        loaded.update(kwargs)
        return FakeModel()

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    models.load_model.__wrapped__("smollm2-135m-instruct", "none")
    assert loaded["device_map"] == {"": 1} and loaded["dtype"] == torch.bfloat16


def test_on_a_cpu_float32_and_no_qlora(monkeypatch):
    on_device(monkeypatch, "cpu")
    assert models.placement("none") == {"dtype": torch.float32}
    with pytest.raises(UserError, match="nf4"):
        models.placement("nf4")


def test_on_a_gpu_each_adapter_trains_on_a_fresh_base_and_none_is_cached(monkeypatch):
    """One bf16 copy of the base per rank: not the cached one plus a deep copy of it."""
    on_device(monkeypatch, "cuda:0")
    calls = []
    fake = types.SimpleNamespace(__wrapped__=lambda ref, q: calls.append(("fresh", ref, q)) or object())
    monkeypatch.setattr(models, "load_model", lambda ref, q: calls.append(("cached", ref, q)) or object())
    monkeypatch.setattr(models.load_model, "__wrapped__", fake.__wrapped__, raising=False)
    models.load_training_base("m", "none")
    models.load_training_base("m", "nf4")
    assert calls == [("fresh", "m", "none"), ("fresh", "m", "nf4")]
    on_device(monkeypatch, "cpu")
    calls.clear()
    models.load_training_base("m", "none")
    assert calls == [("cached", "m", "none")]  # on a CPU: a deep copy of the cached base (a GGUF read once)


# -- vLLM: the rank check ---------------------------------------------------------------------------------------
def test_lora_rank_maps_to_the_smallest_max_lora_rank_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]


def test_a_lora_rank_vllm_cannot_serve_is_refused_at_params_load_naming_the_field():
    with pytest.raises(UserError, match=r"quickstart.yaml.*: finetune.lora.r: 600 is above the largest LoRA rank vLLM serves \(512\)"):
        load_params(QUICKSTART, ["infer.engine=vllm", "finetune.lora.r=600"])
    assert load_params(QUICKSTART, ["finetune.lora.r=600"]).finetune.lora.r == 600  # transformers serves any rank


# -- vLLM: one engine per base model, its arguments ------------------------------------------------------------
class FakeTokenizer:
    chat_template = "{{ the run's template }}"

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=True):
        return "<user>" + conversation[0]["content"] + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # the template already holds them
        return {"input_ids": [ord(c) % 97 for c in text]}


@pytest.fixture
def fake_vllm(monkeypatch):
    """A vllm package that records engines, requests and teardown instead of using a GPU."""
    events: list = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            events.append(("engine", kwargs))

        def generate(self, prompts, sampling, lora_request=None):
            events.append(("generate", prompts, sampling, lora_request))
            k = sampling[0].kwargs["n"]
            out = types.SimpleNamespace(text=" answer ", token_ids=[1, 2], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out] * k, prompt_token_ids=p["prompt_token_ids"]) for p in prompts]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.name, self.lora_id, self.path = name, lora_id, path

    modules = {
        "vllm": types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams),
        "vllm.lora": types.SimpleNamespace(),
        "vllm.lora.request": types.SimpleNamespace(LoRARequest=LoRARequest),
        "vllm.distributed": types.SimpleNamespace(cleanup_dist_env_and_memory=lambda: events.append(("teardown",))),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    templates = []
    monkeypatch.setattr(infer, "load_tokenizer", lambda ref, template: templates.append(template) or FakeTokenizer())
    return events, templates


def work_for(params, run_dir: Path, model_ref: str) -> list:
    """Two tasks × volumes 0, 2, 4 of one base model, three prompts each."""
    items = []
    for task in ("closed_qa", "summarization"):
        prompts = [{"prompt_id": f"{task}-{i}", "instruction": f"{task} question {i}"} for i in range(3)]
        cells = [{"volume": v, "adapter": f"finetune/{task}/m/{v}" if v else None, "content": None,
                  "unit": infer.answer_unit(params, run_dir, task, model_ref, v, prompts, None)} for v in (0, 2, 4)]
        items.append((task, cells, prompts))
    return items


def test_one_vllm_engine_per_base_model_reused_across_tasks_and_volumes_then_torn_down(fake_vllm, tmp_path):
    events, templates = fake_vllm
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    params = load_params(QUICKSTART, ["infer.engine=vllm", "finetune.lora.r=4", "infer.k=3", "infer.batch_size=2",
                                      f"finetune.chat_template={template}"])
    second = str(Path(models.resolve("smollm2-135m-instruct").location) / models.resolve("smollm2-135m-instruct").gguf_file)
    for model_ref in ("smollm2-135m-instruct", second):
        answered = infer.answer_base_model(params, tmp_path, model_ref, work_for(params, tmp_path, model_ref))
        assert len(answered) == 6
    kinds = [e[0] for e in events]
    assert kinds == ["engine"] + ["generate"] * 6 + ["teardown"] + ["engine"] + ["generate"] * 6 + ["teardown"]
    assert templates == [template, template]  # the run's chat template renders the prompts vLLM gets
    engine = events[0][1]
    assert engine["enable_lora"] and engine["max_lora_rank"] == 8 and engine["seed"] == params.seed
    assert engine["tokenizer"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a GGUF's tokenizer from its Hub model
    loras = [e[3] for e in events[1:7]]
    assert [lo.lora_id if lo else None for lo in loras] == [None, 1, 2, None, 3, 4]  # unique for the engine's life
    assert loras[4].path == str(tmp_path / "finetune/summarization/m/2")
    prompts = events[1][1]
    assert prompts[0] == {"prompt_token_ids": FakeTokenizer()("<user>closed_qa question 0<assistant>", add_special_tokens=False)["input_ids"]}
    for unit in (c["unit"] for _, cells, _ in work_for(params, tmp_path, "smollm2-135m-instruct") for c in cells):
        assert Unit.current(unit)  # every file written and recorded by the unit itself


def test_vllm_and_transformers_sample_with_the_same_seed_k_and_settings(fake_vllm, monkeypatch, tmp_path):
    events, _ = fake_vllm
    params = load_params(QUICKSTART, ["infer.engine=vllm", "finetune.lora.r=8", "infer.k=3", "infer.batch_size=2",
                                      "infer.temperature=0.6", "infer.top_p=0.8", "infer.max_new_tokens=17"])
    work = work_for(params, tmp_path, "smollm2-135m-instruct")
    infer.answer_base_model(params, tmp_path, "smollm2-135m-instruct", work[:1])
    vllm_settings = [[s.kwargs for s in e[2]] for e in events if e[0] == "generate"]

    hf_calls = []

    def generate_chat(model, tokenizer, conversations, **kwargs):
        hf_calls.append(kwargs)
        return [[types.SimpleNamespace(text="a", output_tokens=1, input_tokens=1, finish_reason="stop")] * kwargs["num_return_sequences"]
                for _ in conversations]

    class FakePeft:
        def __init__(self):
            self.disable_adapter = lambda: __import__("contextlib").nullcontext()

        def load_adapter(self, *a, **k): ...
        def set_adapter(self, *a): ...
        def eval(self): ...
        def unload(self): ...

    import peft

    monkeypatch.setattr(infer, "generate_chat", generate_chat)
    monkeypatch.setattr(infer, "load_model", lambda ref, q: object())
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: FakePeft())
    hf_params = params.model_copy(update={"infer": params.infer.model_copy(update={"engine": "transformers"})})
    infer.answer_base_model(hf_params, tmp_path, "smollm2-135m-instruct", work[:1])
    # transformers: one generate call per batch of 2 prompts (3 prompts: batches at 0 and 2), per volume
    hf_settings = [dict(n=c["num_return_sequences"], temperature=c["temperature"], top_p=c["top_p"], max_tokens=c["max_new_tokens"],
                        seed=c["seed"]) for c in hf_calls]
    per_prompt_vllm = [s for volume in vllm_settings for s in (volume[0], volume[2])]  # the first prompt of each batch
    assert per_prompt_vllm == hf_settings
    assert hf_settings[0] == {"n": 3, "temperature": 0.6, "top_p": 0.8, "max_tokens": 17,
                              "seed": infer.volume_seed(params, "closed_qa", 0)}
    assert hf_settings[1]["seed"] == hf_settings[0]["seed"] + 2


def test_greedy_means_top_p_one_on_vllm_as_transformers_ignores_it():
    params = load_params(QUICKSTART, ["infer.temperature=0"])
    assert infer.vllm_sampling_args(params, 5) == {"n": 2, "temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 5}


def test_a_vllm_engine_sharing_a_gpu_with_other_units_takes_only_its_share():
    params = load_params(QUICKSTART, ["infer.engine=vllm", "execution.backend=ray", "execution.gpus_per_unit=0.5"])
    assert infer.vllm_engine_args(params, "smollm2-135m-instruct")["gpu_memory_utilization"] == 0.45
    assert "gpu_memory_utilization" not in infer.vllm_engine_args(load_params(QUICKSTART, ["infer.engine=vllm"]), "smollm2-135m-instruct")
