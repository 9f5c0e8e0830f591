"""The migration on a real, independently written server: a tiny run, then stage 07 · deploy. Its GGUF is
loaded by llama.cpp's server (`llama-cpp-python[server]==0.3.36`, the install the real-server tier shares),
answers the test prompts, is judged, and compared with the adapter as evaluated; a wrong chat template in
the export makes the check warn; and `infer.engine: openai` answers through the real server — each
adapter volume by its exported model — or is refused when the server does not serve a volume.

Service LLM for synthesis: the OpenAI emulator (synthesis is not what is tested here); judge: the local
likelihood judge on the packaged SmolLM2 (deterministic, and it reads the answers). Run by
`make test-real-server` and in CI; skipped unless LLAMADUO_REAL_SERVER=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from llamaduo_nb import serving
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_json, read_jsonl
from llamaduo_nb.pipeline import runner
from llamaduo_nb.core.params import PROJECT_ROOT
from llamaduo_nb.stages import deploy
from tests.emulators.openai_emulator import OpenAIEmulator
from tests.test_change_matrix import service_reply
from tests.tiers import REAL_SERVER

pytestmark = REAL_SERVER

SMOL = "smollm2-135m-instruct"
WRONG_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no roles, no assistant turn

TINY = """\
run_name: real-deploy
tasks: [closed_qa]
coverage: {{source: bundled, max_test_prompts: 2}}
service: {{backend: openai, model: emu-service, base_url: "{url}", max_retries: 0, max_reasks: 0}}
synthesize: {{samples_per_task: 4, pairs_per_call: 2, max_new_tokens: 256}}
finetune:
  base_models: [{model}]
  volumes: [2, 4]
  quantization: none
  max_length: 96
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
  learning_rate: 1.0e-3
infer: {{k: 2, max_new_tokens: 16, batch_size: 2}}
evaluate: {{m: 1, judges: [{{backend: local}}], bootstrap: 200, pairwise: false, service_answers: false, reference_metrics: false}}
deploy: {{enabled: false}}
"""


def in_process(params_file, run_dir, *overrides, stages=None, force=()):
    logs: list[str] = []
    runner.run(params_file, run_dir, list(overrides), stages=stages, force=list(force), log=logs.append,
               execute=runner.execute_in_process)
    return logs


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny finished run (stages 01–07, deploy not yet run), shared by every test here."""
    base = tmp_path_factory.mktemp("deploy")
    with OpenAIEmulator(reply=service_reply) as emu:
        params_file = base / "tiny.yaml"
        params_file.write_text(TINY.format(url=emu.url, model=SMOL))
        in_process(params_file, base / "run")
    return params_file, base / "run"


@pytest.fixture(scope="module")
def deployed(finished, tmp_path_factory):
    """The finished run, then `llamaduo run … --stages deploy,report` as a user runs it (notebooks through papermill)."""
    params_file, source = finished
    run_dir = tmp_path_factory.mktemp("deployed") / "run"
    shutil.copytree(source, run_dir)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", str(params_file), "--run-dir", str(run_dir),
                           "--stages", "deploy,report"], cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return params_file, run_dir, proc.stdout + proc.stderr


def test_the_exported_gguf_served_by_llama_cpp_is_the_evaluated_model(deployed):
    _, run_dir, output = deployed
    cells = deploy.load_cells(run_dir)
    assert len(cells) == 1
    cell = cells.iloc[0]
    assert cell["task"] == "closed_qa" and cell["volume"] in (2, 4) and cell["why"]
    folder = deploy.cell_folder(run_dir, cell.to_dict())
    assert (folder / "export" / "model.q8_0.gguf").stat().st_size > 100 * 2**20
    assert (folder / "export" / "merged" / "model.safetensors").exists()
    assert (folder / "export" / "merged" / "chat_template.jinja").exists()
    assert (folder / "export" / "Modelfile").read_text().startswith("FROM ./model.q8_0.gguf")
    assert cell["tokens_per_s"] > 0
    # two test prompts cannot show equivalence within ±5 points, and must not show a difference
    assert cell["parity"].startswith(("equivalent", "not shown equivalent")), cell["parity"]
    assert not isinstance(cell["warning"], str) or not cell["warning"], cell["warning"]
    parity = deploy.load_parity(run_dir)
    assert set(parity["metric"]) == {"similarity", "precision"}
    assert parity["greedy_agreement"].iloc[0] >= 0.5 and parity["prompts"].eq(2).all()
    assert ((parity["difference_ci_low"] <= 0) & (parity["difference_ci_high"] >= 0)).all()
    served = read_jsonl(folder / "parity" / "served_answers.jsonl")
    assert len(served) == 2 * 2 and all(r["output_tokens"] > 0 for r in served)  # K answers per prompt, with tokens
    commands = (run_dir / "deploy" / "COMMANDS.md").read_text()
    assert "llama-server -m" in commands and "--no-repack" in commands and "llamaduo serve" in commands
    # the report shows what was deployed
    assert (run_dir / "report" / "served_vs_adapter.png").exists()
    html = (run_dir / "report.html").read_text()
    assert "Deployable" in html and "equivalent" in html
    assert not read_json(run_dir / "manifest.json")["stages"]["deploy"].get("warnings")
    print(f"deploy: parity {parity[['metric', 'adapter_mean', 'served_mean', 'difference', 'greedy_agreement']].to_dict('records')}, "
          f"{cell['tokens_per_s']} tokens/s, GGUF {cell['gguf_mb']} MiB")


def test_a_wrong_chat_template_in_the_export_warns(deployed, tmp_path, capsys):
    params_file, source, _ = deployed
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    in_process(params_file, run_dir, f"deploy.chat_template={WRONG_TEMPLATE}", stages="deploy")
    cells = deploy.load_cells(run_dir)
    warning = cells["warning"].iloc[0]
    assert isinstance(warning, str) and "the served model differs from the evaluated adapter" in warning
    assert "the greedy answers agree on their first 5 words" in warning
    assert "WARNING deploy" in capsys.readouterr().out
    assert read_json(run_dir / "manifest.json")["stages"]["deploy"]["warnings"]
    assert deploy.load_parity(run_dir)["greedy_agreement"].iloc[0] < 0.5


def test_infer_through_the_real_server_answers_each_volume_by_its_own_model(deployed, tmp_path):
    params_file, source, _ = deployed
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    cells = [f"closed_qa/{SMOL}/2", f"closed_qa/{SMOL}/4"]  # the volume exported above is reused, the other exported
    in_process(params_file, run_dir, f"deploy.cells={json.dumps(cells)}", "deploy.parity=false", stages="deploy")
    exported = deploy.load_cells(run_dir)
    models = [(deploy.cell_folder(run_dir, c) / "export" / "model.q8_0.gguf", c["name"]) for c in exported.to_dict("records")]
    base_gguf = serving.packaged_gguf()

    with serving.LlamaServer(tmp_path / "base.log", model=base_gguf, alias=SMOL) as server:  # a stock server: base model only
        with pytest.raises(UserError, match=rf"does not serve {SMOL}-closed_qa-2, {SMOL}-closed_qa-4 \(it lists: {SMOL}\)"):
            in_process(params_file, run_dir, "infer.engine=openai", f"infer.base_url={server.url}", stages="infer", force=["", "infer"])
        assert server.chat_requests() == {}  # refused before a single answer

    with serving.LlamaServer(tmp_path / "all.log", models=[(base_gguf, SMOL)] + models) as server:
        in_process(params_file, run_dir, "infer.engine=openai", f"infer.base_url={server.url}", "infer.temperature=0",
                   stages="infer", force=["", "infer"])
        requests = sum(server.chat_requests().values())
    answers = {v: pd.DataFrame(read_jsonl(run_dir / "infer" / "closed_qa" / SMOL / f"{v}.jsonl")) for v in (0, 2, 4)}
    for frame in answers.values():  # K answers per prompt (the server ignores n), with tokens
        assert len(frame) == 2 * 2 and sorted(frame["k"].unique()) == [0, 1] and frame["output_tokens"].gt(0).all()
    assert requests == 1 + 3 * 2 * 2  # the n probe, then K seeded requests per prompt for volumes 0, 2, 4
    # the volume the deploy stage checked is answered by its own export: its greedy answers, word for word
    chosen = deploy.load_cells(source).iloc[0].to_dict()
    greedy = {r["prompt_id"]: r["served"] for r in read_jsonl(deploy.cell_folder(source, chosen) / "parity" / "greedy.jsonl")}
    first = answers[int(chosen["volume"])].query("k == 0").set_index("prompt_id")["response"]
    assert {p: first[p] for p in greedy} == greedy


def _serve_and_ask(command: str, name: str, log) -> dict:
    """Start a serving command from COMMANDS.md on a free port, ask it one chat completion, stop it."""
    import shlex
    import time
    import urllib.request

    argv = shlex.split(command)
    port = serving.free_port()
    argv[argv.index("--port") + 1] = str(port)
    if argv[0] == "llamaduo":  # the console script, as this interpreter runs it
        argv = [sys.executable, "-m", "llamaduo_nb"] + argv[1:]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{command} exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{command} did not answer within 120 s"
                time.sleep(0.5)
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            return json.loads(resp.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_llama_cpp_command_in_commands_md_answers_a_chat_completion(deployed, tmp_path):
    """The commands handed to the user, run as written (but the port): `llamaduo serve` (llama-cpp-python, the weight
    repack off, as on AMX CPUs it must be) always; `llama-server … --no-repack` where llama.cpp's binary is installed."""
    _, run_dir, _ = deployed
    cell = deploy.load_cells(run_dir).iloc[0]
    commands = json.loads((deploy.cell_folder(run_dir, cell.to_dict()) / "export" / "commands.json").read_text())
    assert "--no-repack" in commands["llama.cpp"] and commands["llama-cpp-python"].startswith("llamaduo serve ")
    servable = ["llama-cpp-python"] + (["llama.cpp"] if shutil.which("llama-server") else [])
    for server in servable:
        with open(tmp_path / f"{server}.log", "wb") as log:
            reply = _serve_and_ask(commands[server], cell["name"], log)
        assert reply["choices"][0]["message"]["content"].strip(), (server, reply)
