"""Stage 08 · deploy and answering through an OpenAI-compatible server, without a real server: the choice
of cells, the Modelfile and the commands, the greedy-agreement and warning rules, the GGUF writer (read
back by transformers' own GGUF loader), and `infer.engine: openai` against the OpenAI emulator (served
names checked before anything is answered, `n` detected, seeds, the cache). The real llama.cpp server
runs these paths in tests/test_real_server.py."""

from __future__ import annotations

import pandas as pd
import pytest

from llamaduo_nb.stages import BY_NAME
from llamaduo_nb import export
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import write_jsonl
from llamaduo_nb.methods import verdict
from llamaduo_nb.stages.evaluate import verdict_rule
from llamaduo_nb.core.params import GGUF_QUANTIZATIONS, Params
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.core.units import StageRun, stage_dir
from llamaduo_nb.stages import deploy, infer
from tests.emulators.openai_emulator import OpenAIEmulator

SMOL = "smollm2-135m-instruct"
JUDGE = "local:smollm2-135m-instruct"


def verdicts(rows: list[tuple], p: Params) -> pd.DataFrame:
    """(cycle, task, local_model, volume, precision level) → the verdict table of answer scores around that level
    (8 prompts, K = 2; the service LLM's rows are named service:…)."""
    answers = []
    for c, t, m, v, level in rows:
        for prompt in range(8):
            for k in range(2):
                answers.append({"cycle": c, "task": t, "local_model": m, "judge": JUDGE, "volume": v, "metric": "precision",
                                "prompt_id": f"p{prompt}", "k": k,
                                "score": level + ((prompt % 4 - 1.5) * 2 if m.startswith("service:") else (prompt % 3 - 1) * 4) + k})
    return verdict.verdict_table(pd.DataFrame(answers), verdict_rule(p), 2, 1)


def params(**deploy_fields) -> Params:
    return Params(tasks=["closed_qa", "summarization"], service={"backend": "local"},
                  cycle={"target": "precision mean >= 70"}, deploy=deploy_fields)


# -- which cells ---------------------------------------------------------------------------------------------
def test_the_volume_the_verdict_chose_is_exported_else_the_best():
    p = params()
    table = verdicts([
        (1, "closed_qa", SMOL, 0, 90),  # the base model is never exported
        (1, "closed_qa", SMOL, 4, 60), (1, "closed_qa", SMOL, 16, 80), (1, "closed_qa", SMOL, 64, 95),
        (1, "summarization", SMOL, 4, 30), (1, "summarization", SMOL, 16, 55),
        (1, "summarization", "service:openai:gpt-4o", -1, 99),  # nor the service LLM
    ], p)
    cells = {c["task"]: c for c in deploy.choose_cells(table, p)}
    assert (cells["closed_qa"]["volume"], cells["closed_qa"]["met"]) == (16, True)
    assert "the smallest volume the verdict passed (precision mean ≥ 70" in cells["closed_qa"]["why"]
    assert (cells["summarization"]["volume"], cells["summarization"]["met"]) == (16, False)
    assert "no volume passed" in cells["summarization"]["why"]


def test_a_later_cycle_and_a_relative_target_count():
    p = Params(tasks=["closed_qa"], service={"backend": "local"}, cycle={"target": "precision mean >= service - 5"})
    table = verdicts([(1, "closed_qa", SMOL, 16, 60), (2, "closed_qa", SMOL, 40, 80), (1, "closed_qa", "service:local:x", -1, 75)], p)
    (cell,) = deploy.choose_cells(table, p)
    assert (cell["volume"], cell["cycle"], cell["met"]) == (40, 2, True)  # +5 over the service, the interval above −5
    assert table.set_index("volume").loc[16, "sequence"] == verdict.FAILED


def test_named_cells_and_an_unknown_one():
    table = verdicts([(1, "closed_qa", SMOL, 4, 60), (1, "closed_qa", SMOL, 16, 75)], params())
    (cell,) = deploy.choose_cells(table, params(cells=[f"closed_qa/{SMOL}/4"]))
    assert (cell["volume"], cell["why"]) == (4, "it is named in deploy.cells")
    with pytest.raises(UserError, match=r"deploy.cells: 'closed_qa/smollm2-135m-instruct/8' was not trained.*closed_qa/smollm2-135m-instruct/16"):
        deploy.choose_cells(table, params(cells=[f"closed_qa/{SMOL}/8"]))


def test_bad_deploy_params_name_the_field_and_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("deploy: {cells: [closed_qa-4]}\n")
    with pytest.raises(UserError, match=r"p.yaml: deploy.cells: 'closed_qa-4': expected task/model/volume"):
        load_params(path)
    path.write_text("deploy: {quantization: q3_k}\n")
    with pytest.raises(UserError, match=r"p.yaml: deploy.quantization: 'q3_k' is not one of q8_0"):
        load_params(path)
    assert set(GGUF_QUANTIZATIONS) == set(export.GGUF_TYPES)


# -- what a team gets -----------------------------------------------------------------------------------------
def test_modelfile_for_a_chatml_model_and_for_another():
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    text = export.modelfile("model.q8_0.gguf", chatml, 0.7, 0.9, 256)
    assert text.startswith("FROM ./model.q8_0.gguf\n")
    assert '<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0.7" in text and "PARAMETER top_p 0.9" in text and "PARAMETER num_predict 256" in text
    other = export.modelfile("m.gguf", "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", 0, 1, 64)
    assert "TEMPLATE" not in other.replace("# TEMPLATE", "") and "tokenizer.chat_template" in other


def test_serve_commands_name_the_export_and_the_adapter(tmp_path):
    folder = tmp_path / "a b"  # a path with a space must survive copy and paste
    commands = export.serve_commands("smol-closed_qa-16", folder, "model.q8_0.gguf", SMOL, tmp_path / "adapter", 16,
                                     "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert commands["llama.cpp"] == f"llama-server -m '{folder}/model.q8_0.gguf' --alias smol-closed_qa-16 --port 8080 --no-repack"
    assert commands["llama-cpp-python"] == f"llamaduo serve '{folder}/model.q8_0.gguf' --alias smol-closed_qa-16 --port 8080"
    assert commands["ollama"].endswith("ollama create smol-closed_qa-16 -f Modelfile && ollama run smol-closed_qa-16")
    assert f"--lora-modules smol-closed_qa-16={tmp_path / 'adapter'}" in commands["vllm (adapter)"]
    assert "--max-lora-rank 16" in commands["vllm (adapter)"] and commands["vllm (adapter)"].startswith("vllm serve HuggingFaceTB/")
    assert f"vllm serve '{folder}/merged' --served-model-name smol-closed_qa-16" in commands["vllm (merged)"]
    no_gguf = export.serve_commands("x", folder, None, "org/model", tmp_path, 8, None)
    assert "llama.cpp" not in no_gguf and "ollama" not in no_gguf


# -- parity rules ---------------------------------------------------------------------------------------------
def test_greedy_agreement_tells_a_late_word_from_a_wrong_start():
    adapter = {"a": "Paris is the capital of France and its largest city", "b": "Yes", "c": "It rains in spring and in May"}
    same = [{"prompt_id": "a", "response": "Paris is the capital of France and its largest city"}, {"prompt_id": "b", "response": "Yes"}]
    assert deploy.greedy_agreement(same, adapter) == (1.0, 1.0)
    late = [{"prompt_id": "a", "response": "Paris is the capital of France and its biggest city"}, {"prompt_id": "b", "response": "Yes"},
            {"prompt_id": "c", "response": "It rains a lot"}]  # parted at the 3rd word
    assert deploy.greedy_agreement(late, adapter) == (round(1 / 3, 3), round(2 / 3, 3))
    wrong = [{"prompt_id": "a", "response": "A: Paris"}, {"prompt_id": "b", "response": "No"}]
    assert deploy.greedy_agreement(wrong, adapter) == (0.0, 0.0)


def parity_rows(outcome: str) -> pd.DataFrame:
    return pd.DataFrame([{"metric": "precision", "judge": JUDGE, "equivalence": outcome, "margin": 5.0,
                          "equivalence_text": f"precision by {JUDGE}: {outcome} (served − adapter …)"}])


def test_a_difference_or_early_parting_greedy_answers_warn_and_too_few_prompts_is_not_equivalence():
    assert deploy._warning(parity_rows(verdict.EQUIVALENT), 0.9, 0.5) == ""
    assert deploy._warning(parity_rows(verdict.NOT_SHOWN_EQUIVALENT), 0.9, 0.5) == ""  # no evidence either way: said, not warned
    assert deploy.parity_outcome(parity_rows(verdict.NOT_SHOWN_EQUIVALENT)).startswith("not shown equivalent (too few prompts)")
    assert deploy.parity_outcome(parity_rows(verdict.EQUIVALENT)).startswith("equivalent within ±5")
    gap = deploy._warning(parity_rows(verdict.DIFFERENT), 0.9, 0.5)
    assert "precision by local:smollm2-135m-instruct: different" in gap
    parted = deploy._warning(parity_rows(verdict.EQUIVALENT), 0.1, 0.5)
    assert "the greedy answers agree on their first 5 words for 10% of the test prompts" in parted and "chat template" in parted


# -- the GGUF writer ------------------------------------------------------------------------------------------
@pytest.mark.long  # 540 MB written and read back (~45 s); the real-server tier serves every export
def test_gguf_written_from_a_model_reads_back_as_that_model(tmp_path):
    """The base model written as an f32 GGUF (its metadata copied) and loaded by transformers' GGUF loader gives
    back every tensor exactly: the name mapping and llama.cpp's q/k row order are right. The chat template is the one given."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from llamaduo_nb.core.models import load_model, resolve

    source = resolve(SMOL)
    base = load_model(SMOL, "none")
    target = tmp_path / "model.f32.gguf"
    info = export.write_gguf(f"{source.location}/{source.gguf_file}", base, target, "f32", "TEMPLATE {{ messages }}", "smol-test")
    assert info["largest_untouched_change"] == 0.0 and info["tensors"] == 272
    reader = gguf.GGUFReader(str(target))
    assert reader.get_field("tokenizer.chat_template").contents() == "TEMPLATE {{ messages }}"
    assert reader.get_field("general.name").contents() == "smol-test"
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == 49152
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=target.name, dtype=torch.float32)
    theirs = again.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_a_wrong_tensor_layout_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from llamaduo_nb.core.models import load_model, resolve

    source = resolve(SMOL)
    base = load_model(SMOL, "none")
    monkeypatch.setattr(export, "_permute_for_llama_cpp", lambda w, *a: w)  # no q/k permutation: the layout check sees nothing
    real_norms = {k: v.clone() for k, v in base.state_dict().items() if "norm" in k}
    try:
        with torch_no_grad():
            base.model.norm.weight.add_(0.5)  # an untouched tensor that differs from the base GGUF's
        with pytest.raises(UserError, match="tensors LoRA did not train differ from the base GGUF's"):
            export.write_gguf(f"{source.location}/{source.gguf_file}", base, tmp_path / "m.gguf", "q8_0", "t", "n")
    finally:
        with torch_no_grad():
            for k, v in real_norms.items():
                base.state_dict()[k].copy_(v)
    assert not list(tmp_path.iterdir())


def torch_no_grad():
    import torch

    return torch.no_grad()


# -- infer.engine: openai through the call path ---------------------------------------------------------------
def finished_adapters(run_dir, prompts: int = 2) -> None:
    """The files infer reads from a finished run (test prompts; adapters of volumes 2 and 4 in runs.csv) and
    the upstream stages' DONE records; the openai engine never opens the adapters themselves."""
    p = Params(tasks=["closed_qa"], service={"backend": "local"}, finetune={"base_models": [SMOL], "volumes": [2, 4]})
    rows = [{"prompt_id": f"p{i}", "task": "closed_qa", "instruction": f"Question {i}?", "reference": f"Answer {i}."} for i in range(prompts)]
    for stage in ("coverage", "synthesize", "deduplicate", "finetune"):
        run = StageRun(BY_NAME[stage], p, run_dir)
        run.begin()
        outputs = []
        if stage == "coverage":
            write_jsonl(stage_dir(run_dir, "coverage") / "test.jsonl", rows)
            outputs = ["test.jsonl"]
        if stage == "finetune":
            pd.DataFrame([{"task": "closed_qa", "local_model": SMOL, "volume": v, "adapter": f"finetune/closed_qa/{SMOL}/{v}",
                           "content": f"weights-{v}"} for v in (2, 4)]).to_csv(stage_dir(run_dir, "finetune") / "runs.csv", index=False)
            outputs = ["runs.csv"]
        run.finish({}, outputs=outputs)


def served_params(url: str, k: int = 2) -> Params:
    return Params(tasks=["closed_qa"], service={"backend": "local"}, finetune={"base_models": [SMOL], "volumes": [2, 4]},
                  infer={"engine": "openai", "base_url": url, "k": k, "max_new_tokens": 8})


class Seen:
    """The emulator's reply script, remembering each chat request's model, seed and n."""

    def __init__(self):
        self.requests = []

    def __call__(self, ctx) -> str:
        self.requests.append((ctx.model, ctx.body.get("seed"), ctx.body.get("n")))
        return f"answer of {ctx.model} to {ctx.prompt} (seed {ctx.body.get('seed')})"


NAMES = [SMOL, f"{SMOL}-closed_qa-2", f"{SMOL}-closed_qa-4"]


def test_a_server_that_does_not_serve_an_adapter_is_refused_before_any_answer(tmp_path):
    seen = Seen()
    finished_adapters(tmp_path)
    with OpenAIEmulator(reply=seen, models=[SMOL]) as emu:  # serves the base model only, like a stock llama.cpp server
        with pytest.raises(UserError, match=rf"does not serve {SMOL}-closed_qa-2, {SMOL}-closed_qa-4 \(it lists: {SMOL}\).*--lora-modules"):
            infer.run(served_params(emu.url), tmp_path)
    assert seen.requests == []  # not one answer asked for
    assert not list(stage_dir(tmp_path, "infer").glob("*/*/*.jsonl"))
    assert not (stage_dir(tmp_path, "infer") / "DONE.json").exists()


@pytest.mark.parametrize("honours_n", [False, True])
def test_k_answers_per_prompt_with_n_or_with_seeded_requests(tmp_path, honours_n):
    seen = Seen()
    finished_adapters(tmp_path)
    with OpenAIEmulator(reply=seen, models=NAMES, honours_n=honours_n) as emu:
        infer.run(served_params(emu.url, k=2), tmp_path)
        probe = seen.requests.pop(0)
        assert probe[2] == 2  # the probe asks for two answers
        answers = infer.load_responses(tmp_path)
        assert len(answers) == 3 * 2 * 2  # volumes 0, 2, 4 × 2 prompts × K = 2
        assert (answers.groupby(["volume", "prompt_id"]).size() == 2).all()
        assert sorted(answers["k"].unique()) == [0, 1]
        assert answers["output_tokens"].gt(0).all() and answers["input_tokens"].gt(0).all()
        by_volume = answers.groupby("volume")["response"].first()
        assert by_volume[2].startswith(f"answer of {SMOL}-closed_qa-2") and by_volume[0].startswith(f"answer of {SMOL} ")
        if honours_n:
            assert len(seen.requests) == 3 * 2 and {r[2] for r in seen.requests} == {2}
        else:  # K requests per prompt, answer k with its own seed
            assert len(seen.requests) == 3 * 2 * 2 and {r[2] for r in seen.requests} == {None}
            seeds = {(model, seed) for model, seed, _ in seen.requests}
            assert len(seeds) == 3 * 2 and all(seed is not None for _, seed in seeds)
        sent = len(seen.requests)
        infer.run(served_params(emu.url, k=2), tmp_path, force=True)  # answered again: every answer from the run's cache
        assert len(seen.requests) == sent + 1  # the n probe only
