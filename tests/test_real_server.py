"""A real, independently written server as the service LLM: llama.cpp's OpenAI-compatible server
(`llama-cpp-python[server]==0.3.36`) on the packaged SmolLM2 GGUF, found by params alone
(`service.backend: openai` + `base_url`, no key).

It takes no `json_schema` response format (a 500 with pydantic's validation error), but constrains
output with `{"type": "json_object", "schema": …}`: the client must find that with one refused request,
keep re-asks for the bounds its grammar ignores, and send each request about once.

Run by `make test-real-server` (which installs the package when missing; the first build of llama.cpp
takes ~10 minutes on 2 cores, later installs come from pip's wheel cache) and in CI. Skipped unless
LLAMADUO_REAL_SERVER=1, so `make test` does not start it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.llm.common import ServiceStopped
from llamaduo_nb.core.params import PROJECT_ROOT, ServiceParams
from llamaduo_nb import serving as real_server
from tests.tiers import REAL_SERVER

pytestmark = REAL_SERVER

MODEL = "smollm2-135m-instruct"

TINY = """\
run_name: real-server
tasks: [closed_qa]
coverage: {{source: bundled, max_test_prompts: 2}}
service:
  backend: openai
  model: {model}
  base_url: {url}
  max_concurrency: 1      # the server answers one request at a time: more would only queue past the timeout
  timeout_s: 180
synthesize: {{samples_per_task: 4, pairs_per_call: 2, max_new_tokens: 256}}
finetune:
  base_models: [smollm2-135m-instruct]
  volumes: [2]
  quantization: none
  max_length: 128
  per_device_train_batch_size: 1
  gradient_accumulation_steps: 1
infer: {{k: 1, max_new_tokens: 24, batch_size: 2}}
evaluate: {{m: 2, max_new_tokens: 160, reference_metrics: false, bootstrap: 100}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with real_server.LlamaServer(log) as running:
        yield running


def _llm(server, tmp_path, **overrides) -> ServiceLLM:
    cfg = dict(backend="openai", model=MODEL, base_url=server.url, max_concurrency=1, timeout_s=180)
    cfg.update(overrides)
    return ServiceLLM(ServiceParams(**cfg), ResponseCache(tmp_path / "cache.sqlite"))


SCORE = {"type": "object", "required": ["score", "reason"],
         "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}, "reason": {"type": "string", "maxLength": 200}}}


def test_json_mode_found_with_one_refused_request(server, tmp_path):
    before = sum(server.chat_requests().values())
    llm = _llm(server, tmp_path)
    reqs = [ChatRequest(messages=({"role": "user", "content": f"Rate this sentence from 0 to 100 and say why: 'The river {i} is wide.'"},),
                        json_schema=SCORE, max_tokens=80, temperature=0.2) for i in range(3)]
    results = llm.run(reqs, progress=False)
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(0 <= r.parsed["score"] <= 100 for r in results)
    assert llm.accounting.json_mode == "json_object+schema"
    sent = sum(server.chat_requests().values()) - before
    assert sent == llm.accounting.api_calls == 3 + 1 + llm.accounting.reasks  # one 500, then each request once


def test_request_the_server_refuses_stops_after_three_requests(server, tmp_path):
    # a role the server does not know: its own validation error, wrapped as a 500, retried by no one
    before = server.chat_requests().get(500, 0)
    llm = _llm(server, tmp_path)
    reqs = [ChatRequest(messages=({"role": "wizard", "content": f"Say {i}."},), max_tokens=8) for i in range(10)]
    with pytest.raises(ServiceStopped) as info:
        llm.run(reqs, progress=False)
    assert "3 requests in a row failed: 500" in str(info.value) and "validation error" in str(info.value)
    assert server.chat_requests().get(500, 0) - before == 3


def test_pipeline_with_the_server_as_service_llm(server, tmp_path):
    params = tmp_path / "real-server.yaml"
    params.write_text(TINY.format(model=MODEL, url=server.url))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # no key anywhere
    before = sum(server.chat_requests().values())
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", str(params), "--run-dir", str(run_dir)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=1800)
    seconds = time.monotonic() - started
    print(f"pipeline with the llama.cpp server: {seconds:.0f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]

    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    pairs = read_jsonl(run_dir / "synthesize" / "pairs.jsonl")
    assert len(pairs) >= 4
    label = f"openai:{MODEL}"
    judgements = read_jsonl(run_dir / "evaluate" / f"openai_{MODEL}.jsonl")
    valid = sum(bool(j["valid"]) for j in judgements)
    assert judgements and valid >= 0.9 * len(judgements), [j["error"] for j in judgements if not j["valid"]]

    sent = sum(server.chat_requests().values()) - before
    # calls: every request a stage made of the service LLM (synthesis, its own answers, judgements, …)
    accounts = [acc for stage in ("synthesize", "evaluate")
                for acc in json.loads((run_dir / stage / "DONE.json").read_text())["llm"].values()]
    logical = sum(acc["requests"] for acc in accounts)
    assert logical >= len(calls) + len(judgements)
    assert sent <= 1.5 * logical, (sent, logical)
    assert sent == sum(acc["api_calls"] for acc in accounts)  # the server saw what the accounting says
    synth_done = json.loads((run_dir / "synthesize" / "DONE.json").read_text())
    assert synth_done["llm"][label]["json_mode"] == "json_object+schema"
    print(f"requests sent {sent} for {logical} calls; judgements valid {valid}/{len(judgements)}")
