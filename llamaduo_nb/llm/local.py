"""An in-process transformers model behind the service-LLM interface.

The offline stand-in for GPT-4o & co. Two things make a 135M-parameter model
usable in that role:
- JSON is made valid by construction: generation is constrained by the request's
  JSON schema with xgrammar (the grammar masks every token that would break it);
- as a judge it does not write digits: a tiny model's written scores are flat (it gave
  0/0 to a good answer; reading its distribution over score tokens gave ~45 to a good
  answer, an unrelated one and an empty one alike). It scores by likelihood instead
  (see `judge_scores`), which is deterministic, so its M repeats agree.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict


from .base import Backend, ChatRequest, Completion



class LocalBackend(Backend):
    name = "local"
    supports_batch = True
    _lock = threading.Lock()  # one model, one generate at a time

    def __init__(self, config):
        super().__init__(config)
        from ..models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(config.model)
        self.model = load_model(config.model)
        self._grammars: dict = {}
        self._distributions: OrderedDict = OrderedDict()  # judge scores and per-reference anchors

    # -- generation ---------------------------------------------------------
    def complete_batch(self, requests: list[ChatRequest]) -> list[Completion]:
        with self._lock:
            out: list = [None] * len(requests)
            groups: dict = {}
            for i, req in enumerate(requests):
                if req.judge_inputs:
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
        from ..models import generate_chat

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

    # -- the stand-in judge ----------------------------------------------------
    def _mean_logprob(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Mean per-token log P(assistant text | user text), for each (user, assistant) pair, batched."""
        import torch

        tok, model = self.tokenizer, self.model
        rows, spans = [], []
        for user, assistant in pairs:
            head = tok(self._prompt_text(({"role": "user", "content": user},)), add_special_tokens=False)["input_ids"]
            body = tok(assistant + tok.eos_token, add_special_tokens=False)["input_ids"]
            rows.append(head + body)
            spans.append((len(head), len(body)))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for i, (h, b) in enumerate(spans):
            targets = ids[i, h : h + b].to(logp.device)
            out.append(logp[i, h - 1 : h + b - 1].gather(1, targets[:, None]).mean().item())
        return out

    def judge_scores(self, instruction: str, reference: str, answer: str) -> dict:
        """Similarity and precision, 0-100, from the model's likelihoods (GPTScore style).

        similarity: how much seeing the answer raises the likelihood of the human reference
          ("repeat this text"), relative to seeing the reference itself;
        precision: the pointwise mutual information between the instruction and the answer,
          relative to that of the human reference (ratio r); an answer tied to the instruction
          more than the reference is (r > 1: typically one that copies the input text) is
          penalised symmetrically, min(r, 1/r).
        Calibrated so that the reference scores 100 and an empty or unrelated answer about 0.
        """
        key = hashlib.sha256(json.dumps([instruction, reference, answer]).encode()).hexdigest()
        if key in self._distributions:
            return self._distributions[key]
        repeat = "Repeat the following text.\n\n"
        ref_key = hashlib.sha256(json.dumps([instruction, reference]).encode()).hexdigest()
        anchors = self._distributions.get(ref_key)
        if anchors is None:
            base, copy, ref_cond, ref_free = self._mean_logprob(
                [(repeat, reference), (repeat + reference, reference), (instruction, reference), ("", reference)]
            )
            anchors = {"base": base, "copy_gain": max(copy - base, 1e-3), "ref_pmi": max(ref_cond - ref_free, 1e-3)}
            self._distributions[ref_key] = anchors
        if answer.strip():
            sim_lp, ans_cond, ans_free = self._mean_logprob([(repeat + answer, reference), (instruction, answer), ("", answer)])
            similarity = (sim_lp - anchors["base"]) / anchors["copy_gain"]
            ratio = (ans_cond - ans_free) / anchors["ref_pmi"]
            precision = min(ratio, 1.0 / ratio) if ratio > 0 else 0.0
        else:
            similarity = precision = 0.0
        result = {
            "similarity": int(round(100 * min(max(similarity, 0.0), 1.0))),
            "precision": int(round(100 * min(max(precision, 0.0), 1.0))),
            "similarity_raw": round(similarity, 4),
            "precision_raw": round(precision, 4),
        }
        self._distributions[key] = result
        while len(self._distributions) > 4096:
            self._distributions.popitem(last=False)
        return result

    # Pairwise verdicts: a tie when the two answers' similarity + precision (0-200) are this close.
    PAIRWISE_TIE_MARGIN = 2

    def _pairwise(self, req: ChatRequest) -> Completion:
        """judge_inputs (instruction, reference, answer_a, answer_b): the answer with the higher
        similarity + precision wins; order-independent by construction."""
        instruction, reference, answer_a, answer_b = req.judge_inputs
        a, b = (self.judge_scores(instruction, reference, x) for x in (answer_a, answer_b))
        score_a, score_b = a["similarity"] + a["precision"], b["similarity"] + b["precision"]
        winner = "tie" if abs(score_a - score_b) <= self.PAIRWISE_TIE_MARGIN else ("A" if score_a > score_b else "B")
        reason = f"local likelihood judge: similarity + precision {score_a} for A vs {score_b} for B"
        return Completion(text=json.dumps({"winner": winner, "reason": reason}), finish_reason="stop")

    def _judge(self, req: ChatRequest) -> Completion:
        if len(req.judge_inputs) == 4:
            return self._pairwise(req)
        instruction, reference, answer = req.judge_inputs
        s = self.judge_scores(instruction, reference, answer)
        body = {
            "similarity_assessment": {
                "score": s["similarity"],
                "reason": f"local likelihood judge: the answer raises the reference's log-likelihood by {s['similarity_raw']:.2f} of what the reference itself does",
            },
            "precision_assessment": {
                "score": s["precision"],
                "reason": f"local likelihood judge: instruction-answer PMI is {s['precision_raw']:.2f} of the human reference's",
            },
        }
        return Completion(text=json.dumps(body), input_tokens=0, output_tokens=0, finish_reason="stop")
