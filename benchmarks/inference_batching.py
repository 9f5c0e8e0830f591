"""Tokens/s of batched generation (K answers per prompt in one generate call, several prompts together)
against one sequence at a time, on the same model and prompts, measured side by side.

    .venv/bin/python benchmarks/inference_batching.py [--prompts 4] [--k 4] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

from llamaduo_nb.stages import coverage
from llamaduo_nb.core.models import generate_chat, load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    rows = [r for r in coverage.read_jsonl(coverage.BUNDLED) if r["split"] == "test"][: args.prompts]
    conversations = [({"role": "user", "content": r["prompt"]},) for r in rows]
    model, tok = load_model(args.model), load_tokenizer(args.model)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9)
    generate_chat(model, tok, conversations[:1], **dict(common, max_new_tokens=4))  # warm-up

    began = time.perf_counter()
    one_tokens = 0
    for conv in conversations:
        for k in range(args.k):
            (gens,) = generate_chat(model, tok, [conv], seed=k, **common)
            one_tokens += gens[0].output_tokens
    one_s = time.perf_counter() - began

    began = time.perf_counter()
    batched = generate_chat(model, tok, conversations, num_return_sequences=args.k, seed=0, **common)
    batch_tokens = sum(g.output_tokens for gens in batched for g in gens)
    batch_s = time.perf_counter() - began

    one_rate, batch_rate = one_tokens / one_s, batch_tokens / batch_s
    print(f"model {args.model}: {args.prompts} prompts × K={args.k}, ≤{args.max_new_tokens} new tokens each")
    print(f"one sequence at a time : {one_tokens:5d} tokens in {one_s:6.1f} s = {one_rate:6.1f} tokens/s")
    print(f"batched (K per call)   : {batch_tokens:5d} tokens in {batch_s:6.1f} s = {batch_rate:6.1f} tokens/s")
    print(f"ratio batched / one-at-a-time: {batch_rate / one_rate:.2f}× (goal ≥ 3×)")


if __name__ == "__main__":
    main()
