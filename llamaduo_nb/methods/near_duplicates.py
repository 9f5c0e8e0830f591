"""MinHash LSH + ROUGE-L near-duplicate removal: the method the deduplicate stage uses (no run-folder IO).

A greedy pass in input order that removes, in this priority:

1. ``exact`` -- the same instruction and response once lower-cased and with
   whitespace collapsed as an earlier pair of the input;
2. ``too_close_to_earlier`` -- ROUGE-L F >= ``rouge_l_threshold`` against a pair
   kept by a previous cycle (``earlier``), or an exact copy of one;
3. ``near_duplicate`` -- ROUGE-L F >= ``rouge_l_threshold`` against a pair of this
   input that was already kept;
4. ``test_leakage`` -- the instruction equals (normalised) or has ROUGE-L F >=
   ``rouge_l_threshold`` against a test prompt.

ROUGE-L is computed only against candidates found by datasketch's
``MinHashLSH(threshold=lsh_threshold, weights=LSH_WEIGHTS)``: for steps 2-3
over word shingles of ``shingle_size`` tokens of instruction + response, with
the earlier pairs inserted first and every kept pair inserted as it is kept;
for step 4 over the instruction's ``LEAKAGE_SHINGLE_SIZE``-token shingles
(default 1: prompts are short) against an index of the test prompts. The
funnel counts removals per reason in its own fixed key order.

Tokens are rouge-score's (lower-case ``[a-z0-9]+`` runs, no stemming), so the
scores are exactly those of ``rouge_scorer.RougeScorer(["rougeL"])`` on
``instruction + "\\n" + response``; the LCS is computed bit-parallel
(Allison-Dix / Hyyrö) instead of with rouge-score's O(mn) table, and
``tests/test_dedup.py`` checks both give identical numbers. A text with no such
token (e.g. entirely non-Latin script) has ROUGE-L 0 with everything, so only
the exact checks can remove it.

MinHash signatures are datasketch's ``affine32`` scheme with a fixed seed; the
shingles are hashed in numpy batches (a shingle's 32-bit hash combines the
CRC32s of its words), which gives the same signature as
``MinHash(num_perm, seed, hashfunc=identity).update_batch(shingle_hashes)``
(checked in the tests), much faster than one MinHash per pair.

Everything is deterministic: no use of Python's salted ``hash`` on strings,
candidates are tried in a fixed order (highest estimated Jaccard first, then
earliest key).
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from llamaduo_nb.core.params import DeduplicateParams
from llamaduo_nb.core.progress import tqdm

SEED = 1  # MinHash permutation seed (fixed: results must not change between runs)
# (false-positive weight, false-negative weight) for datasketch's choice of LSH
# bands. A false positive only costs one ROUGE-L computation, a false negative
# keeps a duplicate, so recall is weighted up; see benchmarks/dedup_scaling.py.
LSH_WEIGHTS = (0.1, 0.9)
# Words per shingle of the leakage index (instruction vs test prompt). Prompts are
# short: one substituted word in a 15-word prompt removes 3 of its 13 3-word
# shingles (Jaccard ~0.6, rarely an LSH candidate at 0.8) but only 1 of its
# ~15 words (Jaccard ~0.9). ROUGE-L still decides; see benchmarks/dedup_scaling.py.
LEAKAGE_SHINGLE_SIZE = 1
REASONS = ("exact", "near_duplicate", "too_close_to_earlier", "test_leakage")
# funnel key -> reason whose removals make the step from the previous key
FUNNEL_STEPS = (
    ("input", None),
    ("after_exact", "exact"),
    ("after_lsh_rouge", "near_duplicate"),
    ("after_earlier", "too_close_to_earlier"),
    ("after_leakage", "test_leakage"),
)

_TOKEN_RE = re.compile(r"[a-z0-9]+")
_SHINGLE_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio)
_CHUNK_SHINGLES = 1 << 15  # shingles hashed per numpy batch (~16 MB at 128 perms)


@dataclass
class DedupOutcome:
    kept: list[dict]  # input pair dicts that survive, in input order
    # each: the pair dict + reason (REASONS), partner (text it collided with: the other pair's
    # instruction + "\n" + response, or the test prompt), partner_id (the other pair's "id";
    # None for test prompts), rouge_l and jaccard (estimated by MinHash; both None when the
    # removal was by exact match after normalisation); in input order
    removed: list[dict]
    funnel: dict  # {"input": n, "after_exact": ..., "after_lsh_rouge": ..., "after_earlier": ..., "after_leakage": ...}
    stats: dict = field(default_factory=dict)  # timings and work counts (diagnostics only)


# ---------------------------------------------------------------- text helpers


def tokenize(text: str) -> list[str]:
    """rouge-score's default tokenisation (no stemmer): lower-case [a-z0-9]+ runs."""
    return _TOKEN_RE.findall(text.lower())


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace (the key of the exact-duplicate check)."""
    return " ".join(text.lower().split())


def pair_text(pair: dict) -> str:
    """The text a pair is compared by: instruction, newline, response."""
    return pair["instruction"] + "\n" + pair["response"]


def _exact_key(pair: dict) -> bytes:
    blob = normalize(pair["instruction"]) + "\x1f" + normalize(pair["response"])
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).digest()


# ---------------------------------------------------------------- ROUGE-L


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a
    return _lcs_with_masks(_lcs_masks(a), len(a), b)


def _lcs_masks(a: Iterable) -> dict:
    masks: dict = {}
    bit = 1
    for t in a:
        masks[t] = masks.get(t, 0) | bit
        bit <<= 1
    return masks


def _lcs_with_masks(masks: dict, m: int, b: Iterable) -> int:
    # Hyyrö's bit-vector LCS: the zero bits of v (within m bits) count the LCS.
    full = (1 << m) - 1
    v = full
    get = masks.get
    for t in b:
        u = v & get(t, 0)
        if u:
            v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def _rouge_f(lcs: int, n_target: int, n_prediction: int) -> float:
    # Same arithmetic as rouge_score.rouge_scorer._score_lcs + scoring.fmeasure.
    if not n_target or not n_prediction:
        return 0.0
    precision = lcs / n_prediction
    recall = lcs / n_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_f(target: str, prediction: str) -> float:
    """ROUGE-L F of two texts; equals RougeScorer(["rougeL"]).score(t, p)["rougeL"].fmeasure."""
    a, b = tokenize(target), tokenize(prediction)
    return _rouge_f(lcs_length(a, b), len(a), len(b))


def _max_rouge_f(n1: int, n2: int) -> float:
    """Upper bound of ROUGE-L F for token counts n1, n2 (LCS <= min)."""
    return 2 * min(n1, n2) / (n1 + n2) if n1 and n2 else 0.0


# ---------------------------------------------------------------- sketches


class _Corpus:
    """Token ids of many texts in one int32 array, and their MinHash signatures."""

    def __init__(self, vocab: "_Vocab"):
        self.vocab = vocab
        self.offsets = [0]
        self._ids = array("i")
        self.tokens: np.ndarray = np.zeros(0, np.int32)
        self.signatures: Optional[np.ndarray] = None

    def add(self, token_lists: Iterable[list[str]]) -> None:
        encode, ids, offsets = self.vocab.encode, self._ids, self.offsets
        for toks in token_lists:
            ids.extend(encode(toks))
            offsets.append(len(ids))

    def freeze(self) -> None:
        self.tokens = np.frombuffer(self._ids, dtype=np.int32).copy() if len(self._ids) else np.zeros(0, np.int32)
        self._ids = array("i")
        self.offsets = np.asarray(self.offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ids(self, i: int, limit: Optional[int] = None) -> list[int]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if limit is not None:
            end = min(end, start + limit)
        return self.tokens[start:end].tolist()

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


class _Vocab:
    def __init__(self):
        self.index: dict[str, int] = {}
        self.crc = array("I")  # CRC32 of each word, by id (stable across runs and processes)

    def encode(self, tokens: list[str]) -> list[int]:
        index = self.index
        try:
            return [index[t] for t in tokens]
        except KeyError:
            out = []
            for t in tokens:
                i = index.get(t)
                if i is None:
                    i = index[t] = len(index)
                    self.crc.append(zlib.crc32(t.encode("utf-8")))
                out.append(i)
            return out

    def word_hashes(self) -> np.ndarray:
        return np.array(self.crc, dtype=np.uint64)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class Sketcher:
    """Word-shingle MinHash signatures compatible with datasketch's affine32 MinHash."""

    def __init__(self, num_perm: int, shingle_size: int, seed: int = SEED):
        self.proto = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        self.num_perm = num_perm
        self.k = shingle_size
        a, b = self.proto.permutations
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.empty = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)

    def shingle_hashes(self, word_hashes: np.ndarray) -> np.ndarray:
        """32-bit hashes of the k-word shingles of one text (one shingle if shorter than k)."""
        return self._shingles(np.asarray(word_hashes, dtype=np.uint64), np.array([0, len(word_hashes)]))[0]

    def _shingles(self, wh: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of several texts laid end to end (wh: uint64 word hashes).

        A shingle's hash is the polynomial sum(w_j * M^(k-1-j)) mod 2^64 of its
        words' hashes, folded to 32 bits. Returns (hashes, counts): all shingle
        hashes in text order and how many each text has.
        """
        k = self.k
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        nwin = np.where(lengths >= k, lengths - k + 1, 0)
        counts = np.where(lengths >= k, nwin, (lengths > 0).astype(np.int64))
        out = np.empty(int(counts.sum()), dtype=np.uint64)
        out_start = np.cumsum(counts) - counts
        total = len(wh)
        with np.errstate(over="ignore"):
            n_long = int(nwin.sum())
            if n_long:
                h = np.zeros(total - k + 1, dtype=np.uint64)
                for j in range(k):
                    h = h * _SHINGLE_MUL + wh[j : total - k + 1 + j]
                before = np.cumsum(nwin) - nwin
                src = np.arange(n_long) + np.repeat(offsets[:-1] - before, nwin)
                dst = np.arange(n_long) + np.repeat(out_start - before, nwin)
                out[dst] = h[src]
            for t in np.flatnonzero((lengths > 0) & (lengths < k)):
                # a text shorter than k words is one shingle of all its words
                g = np.zeros(1, dtype=np.uint64)
                for x in wh[offsets[t] : offsets[t + 1]]:
                    g = g * _SHINGLE_MUL + x
                out[out_start[t]] = g[0]
            folded = ((out >> np.uint64(32)) ^ out) & np.uint64(0xFFFFFFFF)
        return folded.astype(np.uint32), counts

    def signatures(self, corpus: _Corpus, limit_tokens: Optional[np.ndarray] = None, progress=None) -> np.ndarray:
        """(len(corpus), num_perm) uint32 signatures; an empty text gets the all-max signature.

        limit_tokens: per text, use only its first that many tokens (the instruction).
        """
        n = len(corpus)
        out = np.empty((n, self.num_perm), dtype=np.uint32)
        wh_all = corpus.vocab.word_hashes()
        offsets = corpus.offsets
        lengths = np.diff(offsets)
        if limit_tokens is not None:
            lengths = np.minimum(lengths, limit_tokens)
        cum = np.cumsum(lengths)
        i = 0
        while i < n:
            # a batch of texts with about _CHUNK_SHINGLES shingles together
            done = int(cum[i - 1]) if i else 0
            j = min(max(int(np.searchsorted(cum, done + _CHUNK_SHINGLES, side="right")), i + 1), n)
            if limit_tokens is None:
                ids = corpus.tokens[offsets[i] : offsets[j]]
                local = offsets[i : j + 1] - offsets[i]
            else:
                pieces = [corpus.tokens[offsets[t] : offsets[t] + lengths[t]] for t in range(i, j)]
                ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
                local = np.concatenate([[0], np.cumsum(lengths[i:j])])
            hashes, counts = self._shingles(wh_all[ids], local)
            out[i:j] = self._minhash(hashes, counts)
            if progress is not None:
                progress.update(j - i)
            i = j
        return out

    def _minhash(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        sig = np.tile(self.empty, (len(counts), 1))
        nonempty = counts > 0
        if len(hashes):
            # (num_perm, shingles) layout: reduceat along the contiguous axis is ~4x faster
            with np.errstate(over="ignore"):
                phv = np.multiply.outer(self.a, _fmix32(hashes))
                phv += self.b[:, None]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
            sig[nonempty] = np.minimum.reduceat(phv, starts, axis=1).T
        return sig


# ---------------------------------------------------------------- the stage


def _record(pair: dict, reason: str, partner_text: str, partner_id, rouge_l, jaccard) -> dict:
    row = dict(pair)
    row.update(
        reason=reason,
        partner=partner_text,
        partner_id=partner_id,
        rouge_l=None if rouge_l is None else float(rouge_l),
        jaccard=None if jaccard is None else float(jaccard),
    )
    return row


def _check_pairs(pairs: list, what: str) -> None:
    for i, p in enumerate(pairs):
        if not isinstance(p, dict) or not isinstance(p.get("instruction"), str) or not isinstance(p.get("response"), str):
            raise ValueError(f"{what}[{i}]: each pair needs string 'instruction' and 'response'")


def _tqdm(progress: bool, **kw):
    return tqdm(disable=not progress, mininterval=0.5, **kw)


def deduplicate(
    pairs: list[dict],
    cfg: DeduplicateParams,
    earlier: Sequence[dict] = (),
    test_prompts: Sequence[str] = (),
    progress: bool = True,
    lsh_weights: tuple[float, float] = LSH_WEIGHTS,
    leakage_shingle_size: Optional[int] = LEAKAGE_SHINGLE_SIZE,
) -> DedupOutcome:
    """Greedy, deterministic deduplication of synthetic pairs; see the module docstring."""
    t_start = time.perf_counter()
    pairs = list(pairs)
    earlier = list(earlier)
    test_prompts = [str(t) for t in test_prompts]
    _check_pairs(pairs, "pairs")
    _check_pairs(earlier, "earlier")
    thr = float(cfg.rouge_l_threshold)
    stats: dict = {}
    removed: dict[int, dict] = {}

    # 1. exact duplicates within the input (first occurrence wins)
    seen: dict[bytes, int] = {}
    survivors: list[int] = []
    survivor_keys: list[bytes] = []
    for i, p in enumerate(pairs):
        key = _exact_key(p)
        j = seen.get(key)
        if j is None:
            seen[key] = i
            survivors.append(i)
            survivor_keys.append(key)
        else:
            q = pairs[j]
            removed[i] = _record(p, "exact", pair_text(q), q.get("id"), None, None)
    del seen
    t_exact = time.perf_counter()

    # tokens and signatures
    vocab = _Vocab()
    sketcher = Sketcher(cfg.num_perm, cfg.shingle_size)
    bar = _tqdm(progress, total=len(survivors) + len(earlier) + len(test_prompts), desc="dedup: tokenize", unit="pair")
    new = _Corpus(vocab)
    n_instr = np.zeros(len(survivors), dtype=np.int64)

    def _pair_tokens(rows, sink=None):
        for r, p in enumerate(rows):
            ti = tokenize(p["instruction"])
            if sink is not None:
                sink[r] = len(ti)
            bar.update(1)
            yield ti + tokenize(p["response"])

    new.add(_pair_tokens((pairs[i] for i in survivors), n_instr))
    new.freeze()
    old = _Corpus(vocab)
    old.add(_pair_tokens(earlier))
    old.freeze()
    test = _Corpus(vocab)

    def _prompt_tokens(texts):
        for t in texts:
            bar.update(1)
            yield tokenize(t)

    test.add(_prompt_tokens(test_prompts))
    test.freeze()
    bar.close()
    t_tok = time.perf_counter()

    bar = _tqdm(progress, total=len(new) * (2 if test_prompts else 1) + len(old) + len(test), desc="dedup: minhash", unit="text")
    sig_new = sketcher.signatures(new, progress=bar)
    sig_old = sketcher.signatures(old, progress=bar)
    leak_sketcher = Sketcher(cfg.num_perm, leakage_shingle_size or cfg.shingle_size)
    sig_test = leak_sketcher.signatures(test, progress=bar) if test_prompts else None
    sig_instr = leak_sketcher.signatures(new, limit_tokens=n_instr, progress=bar) if test_prompts else None
    bar.close()
    t_sig = time.perf_counter()

    # LSH indexes: earlier pairs first (keys -1, -2, ...), then kept pairs (their input index)
    lsh = MinHashLSH(threshold=cfg.lsh_threshold, num_perm=cfg.num_perm, weights=lsh_weights)
    probe = sketcher.proto.copy()  # carrier of hash values for insert/query; LSH keeps only band keys
    for j in range(len(old)):
        if old.length(j):
            probe.hashvalues = sig_old[j]
            lsh.insert(-(j + 1), probe, check_duplication=False)
    earlier_keys = {_exact_key(p): j for j, p in enumerate(earlier)}
    test_lsh = None
    if test_prompts:
        test_lsh = MinHashLSH(threshold=cfg.lsh_threshold, num_perm=cfg.num_perm, weights=lsh_weights)
        for j in range(len(test)):
            if test.length(j):
                probe.hashvalues = sig_test[j]
                test_lsh.insert(j, probe, check_duplication=False)
    test_exact: dict[str, int] = {}
    for j, t in enumerate(test_prompts):
        test_exact.setdefault(normalize(t), j)

    n_candidates = n_lcs = 0
    n_pruned = 0
    row_of = {}  # input index -> row in `new`/signatures

    def best_match(masks, m, sig, cands, corpus, corpus_sig, row):
        """First candidate (highest estimated Jaccard first) with ROUGE-L F >= thr."""
        nonlocal n_lcs, n_pruned
        rows = [row(c) for c in cands]
        jac = np.count_nonzero(corpus_sig[rows] == sig, axis=1) / sig.shape[0]
        order = sorted(range(len(cands)), key=lambda x: (-jac[x], cands[x]))
        for x in order:
            r = rows[x]
            n = corpus.length(r)
            if _max_rouge_f(m, n) + 1e-9 < thr:  # margin: the bound is computed with other roundings
                n_pruned += 1
                continue
            n_lcs += 1
            f = _rouge_f(_lcs_with_masks(masks, m, corpus.ids(r)), n, m)
            if f >= thr:
                return cands[x], f, float(jac[x])
        return None

    kept: list[int] = []
    bar = _tqdm(progress, total=len(survivors), desc="dedup: filter", unit="pair")
    for r, i in enumerate(survivors):
        bar.update(1)
        p = pairs[i]
        m = new.length(r)
        toks = None
        # 2. earlier cycles: exact copy, then LSH + ROUGE-L
        j = earlier_keys.get(survivor_keys[r]) if earlier_keys else None
        if j is not None:
            q = earlier[j]
            removed[i] = _record(p, "too_close_to_earlier", pair_text(q), q.get("id"), None, None)
            continue
        hit = None
        if m:
            sig = sig_new[r]
            probe.hashvalues = sig
            cands = lsh.query(probe)
            if cands:
                n_candidates += len(cands)
                toks = new.ids(r)
                masks = _lcs_masks(toks)
                olds = [c for c in cands if c < 0]
                if olds:
                    hit = best_match(masks, m, sig, olds, old, sig_old, lambda c: -c - 1)
                    if hit is not None:
                        q = earlier[-hit[0] - 1]
                        removed[i] = _record(p, "too_close_to_earlier", pair_text(q), q.get("id"), hit[1], hit[2])
                        continue
                news = [c for c in cands if c >= 0]
                if news:
                    # 3. near duplicate of a pair kept from this input
                    hit = best_match(masks, m, sig, news, new, sig_new, row_of.__getitem__)
                    if hit is not None:
                        q = pairs[hit[0]]
                        removed[i] = _record(p, "near_duplicate", pair_text(q), q.get("id"), hit[1], hit[2])
                        continue
        # 4. test leakage
        if test_prompts:
            j = test_exact.get(normalize(p["instruction"]))
            if j is not None:
                removed[i] = _record(p, "test_leakage", test_prompts[j], None, None, None)
                continue
            mi = int(n_instr[r])
            if mi:
                isig = sig_instr[r]
                probe.hashvalues = isig
                tc = test_lsh.query(probe)
                if tc:
                    n_candidates += len(tc)
                    imasks = _lcs_masks(new.ids(r, limit=mi))
                    hit = best_match(imasks, mi, isig, tc, test, sig_test, int)
                    if hit is not None:
                        removed[i] = _record(p, "test_leakage", test_prompts[hit[0]], None, hit[1], hit[2])
                        continue
        # kept
        kept.append(i)
        row_of[i] = r
        if m:
            probe.hashvalues = sig_new[r]
            lsh.insert(i, probe, check_duplication=False)
    bar.close()
    t_end = time.perf_counter()

    counts = {reason: 0 for reason in REASONS}
    for row in removed.values():
        counts[row["reason"]] += 1
    funnel, left = {}, len(pairs)
    for key, reason in FUNNEL_STEPS:
        if reason is not None:
            left -= counts[reason]
        funnel[key] = left
    assert funnel["after_leakage"] == len(kept)
    stats.update(
        seconds_total=t_end - t_start,
        seconds_exact=t_exact - t_start,
        seconds_tokenize=t_tok - t_exact,
        seconds_minhash=t_sig - t_tok,
        seconds_filter=t_end - t_sig,
        lsh_bands=lsh.b,
        lsh_rows=lsh.r,
        candidates=n_candidates,
        lcs_computed=n_lcs,
        lcs_skipped_by_length=n_pruned,
        vocabulary=len(vocab.index),
    )
    return DedupOutcome(
        kept=[pairs[i] for i in kept],
        removed=[removed[i] for i in sorted(removed)],
        funnel=funnel,
        stats=stats,
    )


def funnel_frame(funnel: dict):
    """The funnel as a table: stage, pairs left, removed at that stage, % of input left."""
    import pandas as pd

    rows, prev = [], None
    total = funnel.get("input") or 0
    for key, value in funnel.items():
        rows.append(
            {
                "stage": key,
                "pairs": int(value),
                "removed": 0 if prev is None else int(prev - value),
                "pct_of_input": round(100.0 * value / total, 2) if total else float("nan"),
            }
        )
        prev = value
    return pd.DataFrame(rows, columns=["stage", "pairs", "removed", "pct_of_input"])
