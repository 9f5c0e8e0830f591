"""Answering test prompts through an OpenAI-compatible server (vLLM, llama.cpp, Ollama): `infer.engine:
openai`, and the deploy stage's parity check. The requests go through the one call path (concurrency,
retries, circuit breaker, the run's response cache, token accounting) and carry a seed.

Two things servers differ in are checked, never assumed:
- which models they serve. GET /v1/models must list the name asked for: llama.cpp's server answers a
  request for any name with the one model it has, so an adapter it does not serve would come back as
  the base model's answers, judged as the adapter's;
- whether they honour `n` (K answers in one request). One probe asks for two; a server that returns
  one (llama.cpp's) is asked K times instead, each with its own seed.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.core.params import ServiceParams
from llamaduo_nb.llm.common import resolve_key
from llamaduo_nb.llm.client import ServiceLLM


def server_config(base_url: str, model: str, api_key_env: Optional[str] = None, max_concurrency: int = 4,
                  timeout_s: float = 300.0) -> ServiceParams:
    """The server as a 'service' of the call path: answers are free text (no re-asks) and cost nothing."""
    return ServiceParams(name=f"server:{model}", backend="openai", model=model, base_url=base_url, api_key_env=api_key_env,
                         max_concurrency=max_concurrency, timeout_s=timeout_s, max_reasks=0, max_retries=3)


def _client(cfg: ServiceParams):
    import openai


    return openai.OpenAI(base_url=cfg.base_url, api_key=resolve_key(cfg, ("OPENAI_API_KEY",)), timeout=min(cfg.timeout_s, 120),
                         max_retries=2)


def served_models(cfg: ServiceParams) -> list[str]:
    """The model names the server lists (GET /v1/models); UserError when nothing answers there."""
    import openai

    try:
        return [m.id for m in _client(cfg).models.list().data]
    except openai.APIConnectionError as exc:
        raise UserError(f"infer.base_url {cfg.base_url}: no server answers ({exc.__cause__ or exc})") from None
    except openai.APIStatusError as exc:
        raise UserError(f"infer.base_url {cfg.base_url}: GET /models answered {exc.status_code}: {exc.message}") from None


def check_served(cfg: ServiceParams, names: list[str], what: str = "infer.engine: openai") -> None:
    """Refuse (one line) when the server does not list every model name the run needs."""
    listed = served_models(cfg)
    missing = [n for n in names if n not in listed]
    if missing:
        raise UserError(
            f"{what}: the server at {cfg.base_url} does not serve {', '.join(missing)} (it lists: {', '.join(listed) or 'nothing'}); "
            "its answers would be another model's. Serve each adapter under that name (vLLM: --lora-modules NAME=ADAPTER_DIR; "
            "the base model: --served-model-name / llama.cpp --alias), or run the deploy stage and serve its exported models")


def honours_n(cfg: ServiceParams) -> bool:
    """Does the server return two choices when asked for `n=2`? (one tiny request)"""
    try:
        resp = _client(cfg).chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": "Say yes."}],
                                                    n=2, max_tokens=1, temperature=1.0, seed=0)
    except Exception:  # noqa: BLE001 - a server that refuses `n` outright does not honour it
        return False
    return len(resp.choices) == 2


def answer(cfg: ServiceParams, cache, prompts: list[dict], k: int, temperature: float, top_p: float, max_new_tokens: int,
           seed: int, use_n: bool, desc: str = "answers", weights: Optional[str] = None) -> list[dict]:
    """K answers per prompt: rows (prompt_id, k, response, input_tokens, output_tokens, finish_reason, latency_s).
    `weights`: the served model's content fingerprint, part of each answer's cache key (a retrained model behind the
    same name is asked again; None: the name alone, for a model the workbench did not make).

    With `use_n` one request per prompt asks for K answers (seed `seed`); otherwise K requests, answer k
    with seed `seed + k`. Raises UserError when a server that was found to honour `n` returns fewer."""

    requests, index = [], []
    for p in prompts:
        messages = ({"role": "user", "content": p["instruction"]},)
        common = dict(messages=messages, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, weights=weights)
        if use_n and k > 1:
            requests.append(ChatRequest(**common, seed=seed, n=k))
            index.append((p["prompt_id"], None))
        else:
            for j in range(k):
                requests.append(ChatRequest(**common, seed=seed + j, repeat=j))
                index.append((p["prompt_id"], j))
    llm = ServiceLLM(cfg, cache)
    began = time.time()
    results = llm.run(requests, desc=desc)
    latency = round((time.time() - began) / max(1, len(requests)), 3)  # wall time per request, concurrency included
    rows = []
    for (prompt_id, j), res in zip(index, results):
        if not res.ok:
            raise UserError(f"{cfg.base_url} ({cfg.model}): a request failed: {res.error}")
        if j is not None:
            rows.append({"prompt_id": prompt_id, "k": j, "response": res.text.strip(), "input_tokens": res.input_tokens,
                         "output_tokens": res.output_tokens, "finish_reason": res.finish_reason, "latency_s": latency})
            continue
        choices = json.loads(res.text)
        if len(choices) != k:
            raise UserError(f"{cfg.base_url} ({cfg.model}): asked for {k} answers with n, got {len(choices)}")
        share = res.output_tokens / k  # usage counts the K answers together; each is given an equal share
        for j2, choice in enumerate(choices):
            rows.append({"prompt_id": prompt_id, "k": j2, "response": choice["text"].strip(), "input_tokens": res.input_tokens,
                         "output_tokens": round(share, 1), "finish_reason": choice["finish_reason"], "latency_s": latency})
    return rows
