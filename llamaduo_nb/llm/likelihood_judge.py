"""The offline stand-in judge: similarity and precision from a small model's likelihoods (GPTScore style).

A 135M-parameter model cannot write meaningful scores (its written or token-distribution scores are
flat), so it scores by likelihood instead; deterministic, so the M repeats agree. Used by the `local`
service backend when a request carries the judge prompt's fields. No run-folder IO.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

# Pairwise verdicts: a tie when the two answers' similarity + precision (0-200) are this close.
PAIRWISE_TIE_MARGIN = 2


class LikelihoodJudge:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._distributions: OrderedDict = OrderedDict()  # judge scores and per-reference anchors

    def _prompt_text(self, messages) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

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


    def pairwise(self, instruction: str, reference: str, answer_a: str, answer_b: str) -> dict:
        """The answer with the higher similarity + precision wins; order-independent by construction."""
        a, b = (self.judge_scores(instruction, reference, x) for x in (answer_a, answer_b))
        score_a, score_b = a["similarity"] + a["precision"], b["similarity"] + b["precision"]
        winner = "tie" if abs(score_a - score_b) <= PAIRWISE_TIE_MARGIN else ("A" if score_a > score_b else "B")
        return {"winner": winner, "reason": f"local likelihood judge: similarity + precision {score_a} for A vs {score_b} for B"}

    def judgement(self, instruction: str, reference: str, answer: str) -> dict:
        """The judge prompt's JSON contract, filled from the likelihood scores."""
        s = self.judge_scores(instruction, reference, answer)
        return {
            "similarity_assessment": {
                "score": s["similarity"],
                "reason": f"local likelihood judge: the answer raises the reference's log-likelihood by {s['similarity_raw']:.2f} of what the reference itself does",
            },
            "precision_assessment": {
                "score": s["precision"],
                "reason": f"local likelihood judge: instruction-answer PMI is {s['precision_raw']:.2f} of the human reference's",
            },
        }
