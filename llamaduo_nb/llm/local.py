"""An in-process transformers model behind the service-LLM interface.

The offline stand-in for GPT-4o & co. Two things make a 135M-parameter model
usable in that role:
- JSON is made valid by construction: generation is constrained by the request's
  JSON schema with xgrammar (the grammar masks every token that would break it);
- as a judge it does not write digits: a tiny model's written scores are flat (it gave
  0/0 to a good answer; reading its distribution over score tokens gave ~45 to a good
  answer, an unrelated one and an empty one alike). It scores by likelihood instead
  (`llm/likelihood_judge.py`), which is deterministic, so its M repeats agree.
"""

from __future__ import annotations

import hashlib
import json
import threading

from llamaduo_nb.llm.base import Backend, ChatRequest, Completion
from llamaduo_nb.llm.likelihood_judge import LikelihoodJudge
from llamaduo_nb.core.models import load_model, load_tokenizer
from llamaduo_nb.core.models import generate_chat


class LocalBackend(Backend):
    name = "local"
    supports_batch = True
    _lock = threading.Lock()  # one model, one generate at a time

    def __init__(self, config):
        super().__init__(config)

        self.tokenizer = load_tokenizer(config.model)
        self.model = load_model(config.model)
        self._grammars: dict = {}
        self.judge = LikelihoodJudge(self.model, self.tokenizer)

    # -- generation ---------------------------------------------------------
    def complete_batch(self, requests: list[ChatRequest]) -> list[Completion]:
        with self._lock:
            out: list = [None] * len(requests)
            groups: dict = {}
            for i, req in enumerate(requests):
                if self._judges(req):
                    out[i] = self._judge(req)
                    continue
                key = (req.temperature, req.top_p, req.max_tokens, json.dumps(req.json_schema, sort_keys=True))
                groups.setdefault(key, []).append(i)
            for idx in groups.values():
                for i, completion in zip(idx, self._generate([requests[i] for i in idx])):
                    out[i] = completion
            return out

    def _grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            # Compact JSON (no free whitespace): fewer tokens to generate, same content.
            self._grammars[key] = xgr.GrammarCompiler(info).compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _prompt_text(self, messages) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        req = requests[0]
        processors = None
        if req.json_schema is not None:
            import xgrammar as xgr

            # A fresh processor per generate call: it keeps per-sequence matcher state.
            processors = [xgr.contrib.hf.LogitsProcessor(self._grammar(req.json_schema))]
        seed = int(hashlib.sha256("".join(r.key("local", self.config.model) for r in requests).encode()).hexdigest()[:8], 16)
        answers = generate_chat(
            self.model, self.tokenizer, [r.messages for r in requests], max_new_tokens=req.max_tokens,
            temperature=req.temperature, top_p=req.top_p, logits_processor=processors, seed=seed,
        )
        return [Completion(text=g.text, input_tokens=g.input_tokens, output_tokens=g.output_tokens, finish_reason=g.finish_reason)
                for (g,) in answers]

    # -- the stand-in judge: requests that carry the judge's or the pairwise prompt's fields ------------
    JUDGE_FIELDS = {"instruction", "reference", "answer"}
    PAIRWISE_FIELDS = {"instruction", "reference", "answer_a", "answer_b"}

    def _judges(self, req: ChatRequest) -> bool:
        return set(dict(req.fields)) in (self.JUDGE_FIELDS, self.PAIRWISE_FIELDS)

    def _judge(self, req: ChatRequest) -> Completion:
        f = dict(req.fields)
        if set(f) == self.PAIRWISE_FIELDS:
            body = self.judge.pairwise(f["instruction"], f["reference"], f["answer_a"], f["answer_b"])
        else:
            body = self.judge.judgement(f["instruction"], f["reference"], f["answer"])
        return Completion(text=json.dumps(body), input_tokens=0, output_tokens=0, finish_reason="stop")
