"""Params: every shipped file validates; mistakes are refused with the file and the field named."""

from pathlib import Path

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.params import PROJECT_ROOT
from llamaduo_nb.core.params_file import load_params

PARAM_FILES = sorted((PROJECT_ROOT / "params").glob("*.yaml"))


def test_there_are_params_files():
    names = {p.name for p in PARAM_FILES}
    assert {"quickstart.yaml", "paper.yaml"} <= names


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_validates(path):
    params = load_params(path)
    assert params.tasks


def test_paper_defaults_are_the_papers():
    p = load_params(PROJECT_ROOT / "params" / "paper.yaml")
    ft = p.finetune
    assert (ft.lora.r, ft.lora.alpha, ft.lora.dropout) == (8, 16, 0.05)
    assert (ft.learning_rate, ft.lr_scheduler_type, ft.warmup_ratio) == (2e-4, "cosine", 0.1)
    assert (ft.per_device_train_batch_size, ft.gradient_accumulation_steps, ft.max_length) == (4, 2, 2048)
    assert ft.volumes == [1024 * 2**n for n in range(9)]  # "2^0..2^8 k"
    assert (p.infer.k, p.evaluate.m, p.evaluate.zetas, p.seed) == (4, 10, [50, 70], 42)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, field",
    [
        ("finetune:\n  lora:\n    r: eight\n", "finetune.lora.r"),
        ("finetune:\n  lora:\n    rank: 8\n", "finetune.lora.rank"),
        ("finetune:\n  volumes: [1000, -5]\n", "finetune.volumes[1]"),
        ("finetune:\n  volumes: [1.5]\n", "finetune.volumes[0]"),
        ("service:\n  backend: cohere\n", "service.backend"),
        ("tasks: [summarization, poetry]\n", "tasks[1]"),
        ("evaluate:\n  zetas: [50, 170]\n", "evaluate.zetas"),
        ("synthesize:\n  prompt: no-such-prompt\n", "synthesize.prompt"),
        ("coverage:\n  source: file\n  path: missing.jsonl\n", "coverage.path"),
        ("service:\n  api_key_env: sk-abc123\n", "service"),
        ("colour: blue\n", "colour"),
        ("finetune:\n  base_models: [no-such-model-alias]\n", "finetune.base_models"),
        ("finetune:\n  base_models: [/tmp/missing.gguf]\n", "finetune.base_models"),
        ("service:\n  backend: local\n  model: nothing-here\n", "service.model"),
        ("finetune:\n  base_models: [HuggingFaceTB/SmolLM2-135M-Instruct, other-org/smollm2-135m-instruct]\n", "finetune.base_models"),
    ],
)
def test_mistakes_name_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert f": {field}" in message, message
    assert "\n" not in message


def test_malformed_yaml_gives_line(tmp_path):
    path = _write(tmp_path, "tasks: [summarization\nseed: 1\n")
    with pytest.raises(UserError, match=r"x.yaml: line \d+: malformed YAML"):
        load_params(path)


def test_missing_file():
    with pytest.raises(UserError, match="params file not found"):
        load_params("no/such/file.yaml")


def test_set_overrides_with_validation(tmp_path):
    path = _write(tmp_path, "run_name: t\n")
    p = load_params(path, ["finetune.lora.r=16", "tasks=[coding]", "infer.temperature=0"])
    assert p.finetune.lora.r == 16 and p.tasks == ["coding"] and p.infer.temperature == 0
    with pytest.raises(UserError, match=r"--set finetune.lora.rr=3.*finetune.lora.rr"):
        load_params(path, ["finetune.lora.rr=3"])
    with pytest.raises(UserError, match="expected key.path=value"):
        load_params(path, ["finetune.lora.r"])
