"""The deduplicate stage's logic: exact, near-duplicate, earlier-cycle and leakage filters."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from llamaduo_nb.methods.near_duplicates import (
    REASONS,
    DedupOutcome,
    Sketcher,
    _Corpus,
    _Vocab,
    deduplicate,
    funnel_frame,
    lcs_length,
    rouge_l_f,
    tokenize,
)
from llamaduo_nb.core.params import DeduplicateParams

ROOT = Path(__file__).resolve().parent.parent
CFG = DeduplicateParams()
SCORER = rouge_scorer.RougeScorer(["rougeL"])


def _words(rng: random.Random, n: int, vocab_size: int = 5000) -> list[str]:
    return [f"w{rng.randrange(vocab_size)}" for _ in range(n)]


def _pair(rng: random.Random, pid: str, n_resp: int = 60) -> dict:
    return {
        "id": pid,
        "instruction": "Summarize the following text about " + " ".join(_words(rng, 8)),
        "response": " ".join(_words(rng, n_resp)) + ".",
    }


def _edit(rng: random.Random, text: str, n: int) -> str:
    words = text.split()
    for _ in range(n):
        pos = rng.randrange(len(words))
        words[pos] = "zz" + str(rng.randrange(10**6))
    return " ".join(words)


def _ids(rows):
    return [r["id"] for r in rows]


def _check_funnel(out: DedupOutcome, n_input: int) -> None:
    f = out.funnel
    assert list(f) == ["input", "after_exact", "after_lsh_rouge", "after_earlier", "after_leakage"]
    values = list(f.values())
    assert values[0] == n_input
    assert all(a >= b for a, b in zip(values, values[1:]))
    counts = {r: sum(1 for x in out.removed if x["reason"] == r) for r in REASONS}
    assert f["input"] - f["after_exact"] == counts["exact"]
    assert f["after_exact"] - f["after_lsh_rouge"] == counts["near_duplicate"]
    assert f["after_lsh_rouge"] - f["after_earlier"] == counts["too_close_to_earlier"]
    assert f["after_earlier"] - f["after_leakage"] == counts["test_leakage"]
    assert f["after_leakage"] == len(out.kept)
    assert len(out.kept) + len(out.removed) == n_input


# ------------------------------------------------------------- ROUGE-L / LCS


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = ["Alpha", "beta", "GAMMA", "delta", "x1", "42", "café", "naïve", "über", "日本", "a-b", "c.d", "e_f", "ǅ", "İstanbul"]
    seps = [" ", "  ", ", ", ".\n", "\t", "!? ", "-", "—"]
    return "".join(rng.choice(alphabet) + rng.choice(seps) for _ in range(n))


def test_tokenize_equals_rouge_score_tokenizer():
    rng = random.Random(0)
    for _ in range(300):
        text = _random_text(rng, rng.randrange(0, 40))
        assert tokenize(text) == rouge_tokenize.tokenize(text, None), text


def _dp_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_fast_rouge_l_equals_rouge_score_on_random_texts():
    rng = random.Random(1)
    for trial in range(400):
        vocab = rng.randrange(2, 30)  # small vocabularies give long common subsequences
        n1, n2 = rng.randrange(0, 150), rng.randrange(0, 150)  # crosses 64-bit word boundaries
        a = " ".join(f"t{rng.randrange(vocab)}" for _ in range(n1))
        b = " ".join(f"t{rng.randrange(vocab)}" for _ in range(n2)) if trial % 5 else _edit(rng, a, 3) if n1 else ""
        expected = SCORER.score(a, b)["rougeL"].fmeasure
        assert rouge_l_f(a, b) == expected  # bit-identical, not approximately
        assert rouge_l_f(b, a) == SCORER.score(b, a)["rougeL"].fmeasure
        ta, tb = tokenize(a), tokenize(b)
        assert lcs_length(ta, tb) == _dp_lcs(ta, tb)
    for _ in range(100):  # texts with punctuation and unicode
        a, b = _random_text(rng, rng.randrange(0, 30)), _random_text(rng, rng.randrange(0, 30))
        assert rouge_l_f(a, b) == SCORER.score(a, b)["rougeL"].fmeasure


def test_removed_rouge_l_is_the_reference_score():
    rng = random.Random(2)
    base = [_pair(rng, f"b{i}") for i in range(20)]
    copies = [dict(p, id=f"c{i}", response=_edit(rng, p["response"], 2)) for i, p in enumerate(base)]
    out = deduplicate(base + copies, CFG, progress=False)
    assert out.removed
    for r in out.removed:
        own = r["instruction"] + "\n" + r["response"]
        assert r["rouge_l"] == SCORER.score(r["partner"], own)["rougeL"].fmeasure


# ------------------------------------------------------------- MinHash


def test_batched_signatures_equal_datasketch_minhash():
    rng = random.Random(3)
    texts = [_words(rng, n, vocab_size=50) for n in [0, 1, 2, 3, 4, 10, 57, 200, 2, 0, 31]]
    for k in (1, 3, 5):
        sk = Sketcher(64, k)
        vocab = _Vocab()
        corpus = _Corpus(vocab)
        corpus.add(texts)
        corpus.freeze()
        sig = sk.signatures(corpus)
        limit = np.array([len(t) // 2 for t in texts])
        sig_half = sk.signatures(corpus, limit_tokens=limit)
        wh = vocab.word_hashes()
        for t, toks in enumerate(texts):
            for s, n in ((sig, len(toks)), (sig_half, int(limit[t]))):
                m = MinHash(num_perm=64, seed=1, hashfunc=lambda x: x)
                m.update_batch([int(x) for x in sk.shingle_hashes(wh[corpus.ids(t)[:n]])])
                assert np.array_equal(m.hashvalues, s[t]), (k, t, n)
        # the shingle count is that of k-word windows (one shingle for a shorter, non-empty text)
        assert len(sk.shingle_hashes(wh[corpus.ids(6)])) == max(57 - k + 1, 1)


def test_shingle_hash_definition():
    # a shingle's hash: CRC32s of its words combined as a base-M polynomial mod 2^64, folded to 32 bits
    import zlib

    M = 0x9E3779B97F4A7C15
    words = ["summarize", "the", "text", "now"]
    crc = [zlib.crc32(w.encode()) for w in words]

    def expected(ws):
        g = 0
        for c in ws:
            g = (g * M + c) % 2**64
        return (g >> 32) ^ (g & 0xFFFFFFFF)

    sk = Sketcher(16, 3)
    assert sk.shingle_hashes(np.array(crc)).tolist() == [expected(crc[0:3]), expected(crc[1:4])]
    assert Sketcher(16, 5).shingle_hashes(np.array(crc)).tolist() == [expected(crc)]


def _greedy_reference(pairs, thr):
    """Brute-force greedy: drop a pair when rouge-score's ROUGE-L F vs any kept pair >= thr."""
    kept = []
    for p in pairs:
        text = p["instruction"] + "\n" + p["response"]
        if all(SCORER.score(k, text)["rougeL"].fmeasure < thr for _, k in kept):
            kept.append((p["id"], text))
    return [i for i, _ in kept]


def test_greedy_matches_brute_force_reference_around_the_threshold():
    # A very low LSH threshold makes (nearly) every overlapping pair a candidate, so the
    # outcome must equal brute-force greedy ROUGE-L; edits of 0-45% of the words put
    # many pairs on both sides of the ROUGE-L threshold.
    rng = random.Random(16)
    base = [_pair(rng, f"b{i}", n_resp=30) for i in range(6)]
    pairs = list(base)
    for i in range(34):
        p = base[i % 6]
        pairs.append(dict(p, id=f"v{i}", response=_edit(rng, p["response"], rng.randrange(0, 15))))
    rng.shuffle(pairs)
    cfg = DeduplicateParams(lsh_threshold=0.05, rouge_l_threshold=0.8)
    out = deduplicate(pairs, cfg, progress=False)
    assert _ids(out.kept) == _greedy_reference(pairs, 0.8)
    scores = [r["rouge_l"] for r in out.removed if r["reason"] == "near_duplicate"]
    assert scores and min(scores) < 0.9  # some removals were close to the threshold
    assert len(out.kept) > 10  # and some pairs below it were kept


# ------------------------------------------------------------- the stage


def test_exact_duplicates_removed_after_normalisation():
    rng = random.Random(4)
    a, b = _pair(rng, "a"), _pair(rng, "b")
    a2 = {"id": "a2", "instruction": "  " + a["instruction"].upper(), "response": a["response"].replace(" ", "\n  ")}
    a3 = dict(a, id="a3")
    out = deduplicate([b, a, a2, a3], CFG, progress=False)
    assert _ids(out.kept) == ["b", "a"]
    assert [(r["id"], r["reason"], r["partner_id"]) for r in out.removed] == [("a2", "exact", "a"), ("a3", "exact", "a")]
    assert out.removed[0]["partner"] == a["instruction"] + "\n" + a["response"]
    _check_funnel(out, 4)
    assert out.funnel["after_exact"] == 2


def test_near_duplicates_removed_with_partner_recorded():
    rng = random.Random(5)
    base = [_pair(rng, f"b{i}", n_resp=80) for i in range(40)]
    near = []
    for i, p in enumerate(base):
        if i % 2:
            near.append(dict(p, id=f"n{i}", response=_edit(rng, p["response"], 1 + i % 4 // 2)))
        else:
            near.append(dict(p, id=f"n{i}", instruction=p["instruction"] + " briefly"))
    pairs = base + near
    random.Random(6).shuffle(pairs)
    out = deduplicate(pairs, CFG, progress=False)
    first = {}
    for p in pairs:
        first.setdefault(p["id"][1:], p["id"])
    assert sorted(_ids(out.kept)) == sorted(first.values())  # the first of each base/copy couple survives
    assert len(out.removed) == 40
    for r in out.removed:
        assert r["reason"] == "near_duplicate"
        assert r["partner_id"] == first[r["id"][1:]]
        assert r["rouge_l"] >= CFG.rouge_l_threshold
        assert 0 < r["jaccard"] <= 1
    _check_funnel(out, 80)
    assert out.funnel["after_lsh_rouge"] == 40


def test_distinct_pairs_all_kept_in_input_order():
    rng = random.Random(7)
    pairs = [_pair(rng, f"p{i}") for i in range(300)]
    out = deduplicate(pairs, CFG, progress=False)
    assert out.kept == pairs
    assert out.removed == []
    assert set(out.funnel.values()) == {300}


def test_rouge_threshold_decides_among_lsh_candidates():
    rng = random.Random(8)
    base = [_pair(rng, f"b{i}", n_resp=80) for i in range(10)]
    near = [dict(p, id=f"n{i}", response=_edit(rng, p["response"], 2)) for i, p in enumerate(base)]
    strict = DeduplicateParams(rouge_l_threshold=1.0)  # only identical token sequences would go
    out = deduplicate(base + near, strict, progress=False)
    assert len(out.kept) == 20
    assert out.stats["lcs_computed"] >= 10  # they were LSH candidates, and ROUGE-L kept them


def test_pairs_close_to_earlier_cycles_removed():
    rng = random.Random(9)
    earlier = [_pair(rng, f"old{i}", n_resp=80) for i in range(30)]
    fresh = [_pair(rng, f"new{i}") for i in range(30)]
    echoes = [dict(p, id=f"echo{i}", response=_edit(rng, p["response"], 1)) for i, p in enumerate(earlier[:10])]
    copies = [dict(p, id=f"copy{i}", instruction=p["instruction"].upper()) for i, p in enumerate(earlier[10:15])]
    pairs = fresh[:15] + echoes + fresh[15:] + copies
    out = deduplicate(pairs, CFG, earlier=earlier, progress=False)
    assert _ids(out.kept) == _ids(fresh)
    assert {r["id"]: r["partner_id"] for r in out.removed} == {
        **{f"echo{i}": f"old{i}" for i in range(10)},
        **{f"copy{i}": f"old{i + 10}" for i in range(5)},
    }
    assert {r["reason"] for r in out.removed} == {"too_close_to_earlier"}
    _check_funnel(out, 45)
    assert out.funnel["after_lsh_rouge"] == 45 and out.funnel["after_earlier"] == 30


def test_test_prompt_copies_removed_as_leakage_and_counted():
    rng = random.Random(10)
    test_prompts = ["Summarize the following text about " + " ".join(_words(rng, 12)) + "?" for _ in range(50)]
    pairs = [_pair(rng, f"p{i}") for i in range(40)]
    leaks = [
        {"id": "leak_exact", "instruction": test_prompts[3].upper() + "  ", "response": "whatever it says"},
        {"id": "leak_plus_word", "instruction": test_prompts[7] + " Thanks", "response": " ".join(_words(rng, 50))},
        {"id": "leak_one_word", "instruction": _edit(rng, test_prompts[9], 1), "response": " ".join(_words(rng, 50))},
    ]
    out = deduplicate(pairs[:20] + leaks + pairs[20:], CFG, test_prompts=test_prompts, progress=False)
    assert _ids(out.kept) == _ids(pairs)
    got = {r["id"]: r for r in out.removed}
    assert set(got) == {"leak_exact", "leak_plus_word", "leak_one_word"}
    assert {r["reason"] for r in got.values()} == {"test_leakage"}
    assert got["leak_exact"]["partner"] == test_prompts[3]
    assert got["leak_plus_word"]["partner"] == test_prompts[7]
    assert got["leak_one_word"]["partner"] == test_prompts[9]
    assert got["leak_one_word"]["rouge_l"] == SCORER.score(test_prompts[9], got["leak_one_word"]["instruction"])["rougeL"].fmeasure
    _check_funnel(out, 43)
    assert out.funnel["after_earlier"] - out.funnel["after_leakage"] == 3


def test_mixed_funnel_is_consistent_and_frame_matches():
    rng = random.Random(11)
    earlier = [_pair(rng, f"old{i}", n_resp=80) for i in range(20)]
    base = [_pair(rng, f"b{i}", n_resp=80) for i in range(60)]
    tests = ["Classify this message about " + " ".join(_words(rng, 10)) for _ in range(20)]
    pairs = list(base)
    pairs += [dict(p, id=f"x{i}") for i, p in enumerate(base[:7])]
    pairs += [dict(p, id=f"n{i}", response=_edit(rng, p["response"], 1)) for i, p in enumerate(base[7:18])]
    pairs += [dict(p, id=f"e{i}", response=_edit(rng, p["response"], 1)) for i, p in enumerate(earlier[:5])]
    pairs += [{"id": f"t{i}", "instruction": t, "response": "ok"} for i, t in enumerate(tests[:4])]
    random.Random(12).shuffle(pairs)
    out = deduplicate(pairs, CFG, earlier=earlier, test_prompts=tests, progress=False)
    _check_funnel(out, len(pairs))
    f = out.funnel
    assert (f["input"], f["after_exact"], f["after_lsh_rouge"], f["after_earlier"], f["after_leakage"]) == (87, 80, 69, 64, 60)
    kept_ids, removed_ids = set(_ids(out.kept)), set(_ids(out.removed))
    assert not kept_ids & removed_ids and kept_ids | removed_ids == set(_ids(pairs))
    assert _ids(out.kept) == [p["id"] for p in pairs if p["id"] in kept_ids]  # input order
    frame = funnel_frame(f)
    assert list(frame["stage"]) == list(f)
    assert list(frame["pairs"]) == list(f.values())
    assert frame["removed"].sum() == len(out.removed)
    assert list(frame["removed"]) == [0, 7, 11, 5, 4]
    assert frame["pct_of_input"].iloc[0] == 100.0


def test_texts_without_rouge_tokens_do_not_collide():
    # rouge-score drops non-[a-z0-9] characters: such texts have ROUGE-L 0 and no shingles
    pairs = [
        {"id": "a", "instruction": "日本語の文章を要約して", "response": "これは要約です"},
        {"id": "b", "instruction": "中文摘要", "response": "这是摘要"},
        {"id": "c", "instruction": "日本語の文章を要約して", "response": "これは要約です"},
    ]
    out = deduplicate(pairs, CFG, test_prompts=["別の質問"], progress=False)
    assert _ids(out.kept) == ["a", "b"]
    assert [(r["id"], r["reason"]) for r in out.removed] == [("c", "exact")]


def test_deterministic_across_runs_and_hash_seeds():
    script = (
        "import json, random, sys; sys.path.insert(0, 'tests');"
        "from test_dedup import _pair, _edit, CFG;"
        "from llamaduo_nb.methods.near_duplicates import deduplicate;"
        "rng = random.Random(13); base = [_pair(rng, f'b{i}') for i in range(60)];"
        "pairs = base + [dict(p, id=f'n{i}', response=_edit(rng, p['response'], 2)) for i, p in enumerate(base)];"
        "random.Random(14).shuffle(pairs);"
        "out = deduplicate(pairs, CFG, test_prompts=[base[0]['instruction']], progress=False);"
        "print(json.dumps([out.funnel, [(r['id'], r['reason'], r['partner_id'], r['rouge_l'], r['jaccard']) for r in out.removed]]))"
    )
    results = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
        results.append(proc.stdout)
    assert results[0] == results[1]
    funnel, removed = json.loads(results[0])
    assert removed and funnel["after_leakage"] < funnel["input"]
    # and in this process, twice
    rng = random.Random(15)
    pairs = [_pair(rng, f"p{i}") for i in range(50)]
    pairs += [dict(p, id=f"q{i}", response=_edit(rng, p["response"], 1)) for i, p in enumerate(pairs)]
    one, two = deduplicate(pairs, CFG, progress=False), deduplicate(pairs, CFG, progress=False)
    assert (one.kept, one.removed, one.funnel) == (two.kept, two.removed, two.funnel)


def test_bad_pairs_refused():
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        deduplicate([{"instruction": "a", "response": "b"}, {"instruction": "a"}], CFG, progress=False)
    with pytest.raises(ValueError, match=r"earlier\[0\]"):
        deduplicate([], CFG, earlier=[{"instruction": 1, "response": "b"}], progress=False)


def test_empty_input():
    out = deduplicate([], CFG, earlier=[{"instruction": "a b c", "response": "d e f"}], test_prompts=["x y z"], progress=False)
    assert out.kept == [] and out.removed == []
    assert set(out.funnel.values()) == {0}


def test_pair_at_exactly_the_threshold_is_removed():
    rng = random.Random(17)
    a = _pair(rng, "a", n_resp=80)
    b = dict(a, id="b", response=_edit(rng, a["response"], 2))
    score = SCORER.score(a["instruction"] + "\n" + a["response"], b["instruction"] + "\n" + b["response"])["rougeL"].fmeasure
    at = deduplicate([a, b], DeduplicateParams(rouge_l_threshold=score), progress=False)
    assert _ids(at.kept) == ["a"] and at.removed[0]["rouge_l"] == score
    above = deduplicate([a, b], DeduplicateParams(rouge_l_threshold=float(np.nextafter(score, 2))), progress=False)
    assert _ids(above.kept) == ["a", "b"]
