"""Bad input never half-runs: one line naming the file and what is wrong, exit code 2, nothing written.

Every row of the README's bad-input table, through the command line (`llamaduo_nb.cli.main`, in
process, so the suite stays fast; one case also as a real subprocess). The runner's notebook
execution is replaced by a tripwire: a case that got past the checks would fail loudly instead of
running a pipeline. The run folder asked for must not exist afterwards, and nothing may appear
under the params' folder except what the test itself wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llamaduo_nb import cli

from llamaduo_nb.pipeline import runner
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.core.params import PROJECT_ROOT

BUNDLED = PROJECT_ROOT / "llamaduo_nb" / "data" / "coverage.jsonl"
LOCAL = "service: {backend: local, model: smollm2-135m-instruct}\nfinetune: {base_models: [smollm2-135m-instruct], quantization: none}\n"


def closed_qa_rows() -> list[dict]:
    return [r for r in read_jsonl(BUNDLED) if r["category"] == "Closed QA"]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def file_coverage(tmp_path: Path, rows) -> str:
    write_rows(tmp_path / "cov.jsonl", rows)
    return f"tasks: [closed_qa]\ncoverage: {{source: file, path: cov.jsonl}}\n{LOCAL}"


def _missing_fields(tmp_path):
    rows = closed_qa_rows()
    del rows[6]["prompt_id"], rows[6]["messages"]
    return file_coverage(tmp_path, rows)


def _unknown_category(tmp_path):
    rows = closed_qa_rows()
    rows[2]["category"] = "Poetry"
    return file_coverage(tmp_path, rows)


def _messages_not_turns(tmp_path):
    rows = closed_qa_rows()
    rows[0]["messages"] = "user: hi / assistant: hello"
    return file_coverage(tmp_path, rows)


def _test_overlaps_train(tmp_path):
    rows = closed_qa_rows()
    test = next(r for r in rows if r["split"] == "test")
    rows.append(dict(test, split="train"))  # the same prompt_id in both splits
    return file_coverage(tmp_path, rows)


def _test_prompt_in_train_under_another_id(tmp_path):
    rows = closed_qa_rows()
    test = next(r for r in rows if r["split"] == "test")
    rows.append(dict(test, split="train", prompt_id="copied-" + test["prompt_id"]))
    return file_coverage(tmp_path, rows)


def _no_rows_for_the_task(tmp_path):
    rows = [r for r in read_jsonl(BUNDLED) if r["category"] == "Coding"]
    return file_coverage(tmp_path, rows)


# (id, params text or a function of tmp_path returning it, extra CLI args, env to drop, what the line must say)
CASES = [
    ("malformed-yaml", "tasks: [closed_qa\nseed: 1\n", [], None, ["x.yaml: line", "malformed YAML"]),
    ("not-a-mapping", "- closed_qa\n- coding\n", [], None, ["x.yaml:", "top level must be a mapping"]),
    ("unknown-key", "colour: blue\n", [], None, ["x.yaml: colour: Extra inputs are not permitted"]),
    ("unknown-nested-key", "finetune:\n  lora:\n    rank: 8\n", [], None, ["x.yaml: finetune.lora.rank: Extra inputs are not permitted"]),
    ("wrong-type", "finetune:\n  lora:\n    r: eight\n", [], None, ["x.yaml: finetune.lora.r: Input should be a valid integer"]),
    ("wrong-type-section", "service: gpt-4o\n", [], None, ["x.yaml: service: Input should be a valid dictionary"]),
    ("volume-negative", "finetune:\n  volumes: [1000, -5]\n", [], None, ["x.yaml: finetune.volumes[1]: Input should be greater than 0"]),
    ("volume-zero", "finetune:\n  volumes: [0]\n", [], None, ["x.yaml: finetune.volumes[0]: Input should be greater than 0"]),
    ("volume-fraction", "finetune:\n  volumes: [1.5]\n", [], None, ["x.yaml: finetune.volumes[0]:", "integer"]),
    ("volume-text", "finetune:\n  volumes: [lots]\n", [], None, ["x.yaml: finetune.volumes[0]:", "integer"]),
    ("unknown-backend", "service:\n  backend: cohere\n", [], None, ["x.yaml: service.backend: Input should be 'local', 'openai', 'anthropic' or 'gemini'"]),
    ("unknown-task", "tasks: [summarization, poetry]\n", [], None, ["x.yaml: tasks[1]:"]),
    ("unknown-local-model", "finetune:\n  base_models: [no-such-model-alias]\n", [], None, ["x.yaml: finetune.base_models:", "no-such-model-alias"]),
    ("unknown-local-service-model", "service:\n  backend: local\n  model: nothing-here\n", [], None, ["x.yaml: service.model:", "nothing-here"]),
    ("unknown-judge-backend", "evaluate:\n  judges: [{backend: mistral, model: m}]\n", [], None, ["x.yaml: evaluate.judges[0].backend:"]),
    ("key-in-params", "service:\n  api_key_env: sk-abc123\n", [], None, ["x.yaml: service:", "NAME of an environment variable"]),
    ("missing-api-key", "service: {backend: openai, model: gpt-4o, api_key_env: LLAMADUO_NO_SUCH_KEY}\n", [],
     "LLAMADUO_NO_SUCH_KEY", ["LLAMADUO_NO_SUCH_KEY is not set"]),
    ("missing-prompt-file", "synthesize:\n  prompt: no-such-prompt\n", [], None, ["x.yaml: synthesize.prompt:", "no-such-prompt"]),
    ("coverage-file-missing", f"coverage: {{source: file, path: missing.jsonl}}\n{LOCAL}", [], None, ["x.yaml: coverage.path: file not found: missing.jsonl"]),
    ("coverage-file-needs-path", "coverage: {source: file}\n", [], None, ["x.yaml: coverage:", "needs coverage.path"]),
    ("coverage-file-empty", lambda t: file_coverage(t, []), [], None, ["cov.jsonl: the coverage set is empty"]),
    ("coverage-not-jsonl", lambda t: file_coverage(t, ["prompt,category", "what,Closed QA"]), [], None, ["cov.jsonl: not valid JSONL"]),
    ("coverage-not-objects", lambda t: file_coverage(t, ['"just a string"']), [], None, ["cov.jsonl: row 1: not an object"]),
    ("coverage-not-schema", _missing_fields, [], None, ["cov.jsonl: row 7: missing prompt_id, messages (expected No Robots' schema"]),
    ("coverage-messages-not-turns", _messages_not_turns, [], None, ["cov.jsonl: row 1: messages must be a list of {role, content} objects"]),
    ("coverage-unknown-category", _unknown_category, [], None, ["cov.jsonl: row 3: category 'Poetry' is not a No Robots category"]),
    ("coverage-no-rows-for-task", _no_rows_for_the_task, [], None, ["cov.jsonl: tasks: no coverage examples for closed_qa"]),
    ("coverage-test-overlaps-train", _test_overlaps_train, [], None, ["cov.jsonl: coverage: 1 prompt(s) are in both the train and the test split"]),
    ("coverage-test-prompt-in-train", _test_prompt_in_train_under_another_id, [], None, ["cov.jsonl: coverage: 1 prompt(s) are in both the train and the test split"]),
    ("set-unknown-field", "run_name: t\n", ["--set", "finetune.lora.rr=3"], None,
     ["x.yaml (with --set finetune.lora.rr=3): finetune.lora.rr: Extra inputs are not permitted"]),
    ("set-unknown-section", "run_name: t\n", ["--set", "finetuning.volumes=[4]"], None, ["x.yaml (with --set finetuning.volumes=[4]): finetuning: Extra inputs are not permitted"]),
    ("set-into-a-value", "run_name: t\n", ["--set", "run_name.x=1"], None, ["--set run_name.x: 'run_name' is not a section"]),
    ("set-without-value", "run_name: t\n", ["--set", "seed"], None, ["--set seed: expected key.path=value"]),
    ("set-wrong-type", "run_name: t\n", ["--set", "infer.k=many"], None, ["x.yaml (with --set infer.k=many): infer.k: Input should be a valid integer"]),
    ("unknown-stage", LOCAL, ["--stages", "coverage,training"], None, ["--stages: unknown stage(s) training"]),
    ("params-file-missing", None, [], None, ["missing.yaml: params file not found"]),
]


@pytest.fixture
def tripwire(monkeypatch):
    """Nothing may be executed: a bad input is refused before the first notebook starts."""
    def execute(stage, *args, **kwargs):
        raise AssertionError(f"stage {stage} was started for bad input")

    monkeypatch.setattr(runner, "_execute", execute)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _params(tmp_path: Path, text) -> Path:
    path = tmp_path / "x.yaml"
    if text is None:
        return tmp_path / "missing.yaml"
    path.write_text(text(tmp_path) if callable(text) else text)
    return path


@pytest.mark.parametrize("text, extra, drop_env, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_input_one_line_exit_2_nothing_written(command, text, extra, drop_env, says, tmp_path, monkeypatch, capsys, tripwire):
    if drop_env:
        monkeypatch.delenv(drop_env, raising=False)
    if command == "validate" and ("--stages" in extra or drop_env):
        pytest.skip("run-only input (stages, API keys)")
    params = _params(tmp_path, text)
    before = _files(tmp_path)
    run_dir = tmp_path / "run"
    argv = [command, str(params)] + (["--run-dir", str(run_dir)] if command == "run" else []) + extra
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in says:
        assert part in lines[0], lines[0]
    assert out == ""
    assert not run_dir.exists() and _files(tmp_path) == before  # nothing written, not even an empty folder


def test_notebook_without_parameters_cell(tmp_path, monkeypatch, capsys, tripwire):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(runner.NOTEBOOK_DIR, notebooks)
    path = notebooks / "02_synthesize.ipynb"
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata["tags"] = [t for t in cell.metadata.get("tags", []) if t != "parameters"]
    nbformat.write(nb, path)
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", notebooks)
    params = _params(tmp_path, LOCAL)
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(params), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: needs exactly one cell tagged 'parameters' (found 0)"]
    assert not run_dir.exists()

    (notebooks / "05_infer.ipynb").unlink()
    shutil.copy(PROJECT_ROOT / "notebooks" / "02_synthesize.ipynb", path)  # 02 mended, 05 gone
    assert cli.main(["run", str(params), "--run-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {notebooks / '05_infer.ipynb'}: notebook missing"]
    assert not run_dir.exists()


def test_a_good_coverage_file_passes_the_same_checks(tmp_path, capsys):
    """The checks refuse only what is wrong: the bundled rows as a file validate."""
    params = _params(tmp_path, lambda t: file_coverage(t, closed_qa_rows()))
    assert cli.main(["validate", str(params)]) == 0, capsys.readouterr().err


def test_unwritable_run_folder_parent_one_line(tmp_path, capsys):
    """The run folder cannot be made (its parent is a file): one line naming it, exit 2."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    params = _params(tmp_path, LOCAL)
    code = cli.main(["run", str(params), "--run-dir", str(tmp_path / "blocker" / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'blocker'}"), err


def test_exit_code_and_line_through_the_real_command(tmp_path):
    params = _params(tmp_path, "tasks: [closed_qa\n")
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", str(params), "--run-dir", str(tmp_path / "run")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {params}: line 2: malformed YAML (expected ',' or ']', but got '<stream end>')"]
    assert not (tmp_path / "run").exists()
