"""`llamaduo doctor PARAMS`: what a params file needs, checked before anything is paid for.

For every service LLM and judge: the key variable, one minimal live request (skipped with
`--offline`) through the same call path a run uses, the JSON mode the server took and the rate
limits it announced beside the configured ones. Then HF_TOKEN where the params need it (gated Hub
models, push_to_hub) and CUDA, bitsandbytes or vLLM where they need those. One line per problem;
exit code 2 when there is any.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.common import resolve_key
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.core.params_file import load_family
from llamaduo_nb.core.models import resolve
from llamaduo_nb import serving

# Hub organisations whose models are gated: downloading them needs an accepted licence and HF_TOKEN
GATED_ORGS = ("google/gemma", "meta-llama/", "mistralai/")

PING_SCHEMA = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}


def _services(family) -> list:
    seen, out = set(), []
    for params in family:
        for cfg in [params.service] + params.judges:
            ident = (cfg.backend, cfg.model, cfg.base_url, cfg.api_key_env)
            if ident not in seen:
                seen.add(ident)
                out.append(cfg)
    return out


def _key_problem(cfg) -> str | None:
    sdk_vars = {"openai": ("OPENAI_API_KEY",), "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"),
                "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY")}[cfg.backend]
    try:
        resolve_key(cfg, sdk_vars)
    except UserError as exc:
        return str(exc)
    name = cfg.api_key_env or ("none (a keyless server)" if cfg.base_url else " or ".join(sdk_vars))
    print(f"  key: {name}{' is set' if cfg.api_key_env else ''}")
    return None


def _ping(cfg) -> list[str]:
    """One minimal request through the run's call path; problems found."""

    with tempfile.TemporaryDirectory(prefix="llamaduo-doctor-") as tmp:
        cache = ResponseCache(Path(tmp) / "doctor.sqlite")
        llm = ServiceLLM(cfg.model_copy(update={"max_retries": min(cfg.max_retries, 2)}), cache)
        request = ChatRequest(messages=({"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'},),
                              max_tokens=200, temperature=0.0, json_schema=PING_SCHEMA)
        try:
            (result,) = llm.run([request], desc="doctor", progress=False)
        except UserError as exc:
            return [str(exc)]
        finally:
            cache.close()
    acc = llm.accounting
    mode = f"; JSON mode {acc.json_mode}" if acc.json_mode else ""
    if not result.ok:
        return [f"service '{cfg.label}': the test request failed: {result.error}"]
    print(f"  live request: answered ({acc.api_calls} request{'s' if acc.api_calls != 1 else ''}{mode}"
          f"{', valid JSON' if result.reasks == 0 else f', valid after {result.reasks} re-ask(s)'})")
    limits = llm.last_limits or {}
    req = limits.get("requests")
    if req and req.get("limit"):
        configured = cfg.requests_per_minute
        note = (f"params say {configured:g}: paced at {min(configured, req['limit']):g}" if configured
                else "paced at that (requests_per_minute is not set)")
        print(f"  provider's limit: {req['limit']:g} requests/min ({req.get('remaining'):g} remaining); {note}")
    tok = limits.get("tokens")
    if tok and tok.get("limit"):
        print(f"  provider's limit: {tok['limit']:g} tokens/min; params say {cfg.tokens_per_minute or 'no limit'}")
    if not limits:
        why = " (Gemini sends none: a 429's retryDelay is honoured)" if cfg.backend == "gemini" else ""
        pace = f"{cfg.requests_per_minute:g}/min (requests_per_minute)" if cfg.requests_per_minute else "unpaced (requests_per_minute is not set)"
        print(f"  provider's limits: no rate-limit headers in the answer{why}; {pace}")
    return []


def _offline_mode(cfg) -> str:
    first = {"openai": "json_schema", "anthropic": "output_config (structured outputs)", "gemini": "response_json_schema"}[cfg.backend]
    return f"{first} (the first refusal steps it down, once per run)"


def check_params(params_file, overrides=None, offline: bool = False) -> int:
    family = load_family(params_file, overrides or [])
    problems: list[str] = []
    for cfg in _services(family):
        where = f", {cfg.base_url}" if cfg.base_url else ""
        print(f"service '{cfg.label}' ({cfg.backend}{where}):")
        if cfg.backend == "local":
            try:
                resolve(cfg.model)
                print("  in-process model: found")
            except UserError as exc:
                problems.append(str(exc))
            continue
        problem = _key_problem(cfg)
        if problem:
            problems.append(problem)
            continue
        if offline:
            print(f"  JSON mode: {_offline_mode(cfg)}; no live request (--offline)")
            continue
        problems += _ping(cfg)
    problems += _local_needs(family)
    if any(p.deploy.enabled and p.deploy.parity for p in family):  # not a problem: the exports are written either way

        print("deploy: parity check " + ("with llama.cpp's server" if serving.available() else
                                         "not measured: llama.cpp's server is not installed (pip install -e '.[serve]')"))
    for line in problems:
        print(f"problem: {line}")
    if problems:
        return 2
    print(f"{params_file}: ready")
    return 0


def _local_needs(family) -> list[str]:
    problems = []
    has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    cuda = None
    for params in family:
        for ref in params.finetune.base_models:
            try:
                source = resolve(ref)
            except UserError as exc:
                problems.append(str(exc))
                continue
            if source.kind == "hub" and ref.startswith(GATED_ORGS) and not has_token:
                problems.append(f"finetune.base_models: {ref} is gated on the Hub: accept its licence and set HF_TOKEN")
        if params.synthesize.push_to_hub and not has_token:
            problems.append("synthesize.push_to_hub: set HF_TOKEN (checked now, before paying for synthesis)")
        needs_cuda = params.finetune.quantization == "nf4" or params.infer.engine == "vllm"
        if needs_cuda:
            if cuda is None:
                try:
                    import torch

                    cuda = torch.cuda.is_available()
                except ImportError:
                    cuda = False
            if not cuda:
                what = "finetune.quantization: nf4" if params.finetune.quantization == "nf4" else "infer.engine: vllm"
                problems.append(f"{what} needs a CUDA GPU (none found)")
        if params.finetune.quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            problems.append("finetune.quantization: nf4 needs bitsandbytes (pip install bitsandbytes)")
        if params.infer.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            problems.append("infer.engine: vllm needs vllm (pip install vllm)")
        if params.tracking.mlflow and importlib.util.find_spec("mlflow") is None:
            problems.append("tracking.mlflow: true needs mlflow (pip install -e '.[track]')")
        for tracker in params.tracking.report_to:  # found missing only when the first adapter starts training
            if importlib.util.find_spec(tracker) is None:
                problems.append(f"tracking.report_to: {tracker} needs the {tracker} package (pip install {tracker})")
    return sorted(set(problems), key=problems.index)


def before_paying(family) -> list[str]:
    """The free checks `llamaduo run` makes before its first paid call: what would otherwise fail only after
    synthesis was paid for (a gated Hub model or push_to_hub without HF_TOKEN, vLLM missing). QLoRA without
    a CUDA GPU is no problem here: fine-tuning falls back to plain LoRA with a warning."""
    return [line for line in _local_needs(family)
            if not line.startswith("finetune.quantization: nf4") or _cuda_available()]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
