"""Scaling and accuracy of the deduplicate stage on synthetic pairs with a known truth.

    .venv/bin/python benchmarks/dedup_scaling.py                 # N = 37.5k, 75k, 150k, 300k
    .venv/bin/python benchmarks/dedup_scaling.py --sizes 37500 75000
    .venv/bin/python benchmarks/dedup_scaling.py --lsh-weights 0.1,0.9

Each size runs in its own process (so its peak RSS is its own). The input is
built from a Zipf-distributed vocabulary of pseudo-words with templated
instructions and is shuffled with a fixed seed; its parts (shares of N):

  base      50%   distinct pairs                                   keep
  hard_neg  10%   template + first ~40% of a base's response, rest new (ROUGE-L ~0.5)   keep
  near      29%   a base with 1-2 word edits (substitute/insert/delete)  remove all but the first of a cluster
  exact      7%   a base or near copy re-cased / re-spaced          (same cluster rule)
  earlier    2%   a previous-cycle pair with 0-2 word edits         remove
  leak       2%   instruction = a test prompt (re-cased, +1 word, or 1 word substituted), new response   remove

"removed" is scored against that truth: precision = share of removed pairs that
are true duplicates; recall = share of true duplicates removed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SIZES = [37_500, 75_000, 150_000, 300_000]
TEMPLATES = [
    "Summarize the following text about {a} and {b}",
    "Classify this {a} message as {b} or not",
    "Write a Python function that computes the {a} of a {b}",
    "Answer the question using the passage about {a} {b}",
    "Give a short summary of the report on {a} in {b}",
    "Which category does this {a} review about {b} belong to",
]
SHARES = {"base": 0.50, "hard_neg": 0.10, "near": 0.29, "exact": 0.07, "earlier": 0.02, "leak": 0.02}


class Gen:
    def __init__(self, seed: int, vocab_size: int = 30_000):
        self.rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = set()
        while len(words) < vocab_size:
            n = int(self.rng.integers(2, 10))
            words.add("".join(self.rng.choice(letters, n)))
        self.words = np.array(sorted(words))
        p = 1.0 / np.arange(1, vocab_size + 1) ** 0.9
        self.p = p / p.sum()
        self.cdf = np.cumsum(self.p)

    def sample(self, n: int) -> list[str]:
        idx = np.searchsorted(self.cdf, self.rng.random(n) * self.cdf[-1])
        return self.words[np.minimum(idx, len(self.words) - 1)].tolist()

    def instruction(self) -> list[str]:
        t = TEMPLATES[int(self.rng.integers(len(TEMPLATES)))]
        a, b = self.sample(2)
        return t.format(a=a, b=b).split() + self.sample(int(self.rng.integers(10, 21)))

    def response(self, n: int | None = None) -> list[str]:
        return self.sample(int(self.rng.integers(40, 121)) if n is None else n)

    def edit(self, words: list[str], n_edits: int) -> list[str]:
        words = list(words)
        for _ in range(n_edits):
            kind = int(self.rng.integers(3))
            pos = int(self.rng.integers(len(words)))
            if kind == 0:
                new = words[pos]
                while new == words[pos]:
                    new = self.sample(1)[0]
                words[pos] = new
            elif kind == 1:
                words.insert(pos, self.sample(1)[0])
            elif len(words) > 4:
                del words[pos]
        return words

    def recase(self, text: str) -> str:
        return "  ".join(text.upper().split()) if self.rng.random() < 0.5 else " " + text.title() + "\n"


def render(words: list[str]) -> str:
    # sentences of ~12 words, capitalised, with punctuation (tokenisation must see through it)
    out = []
    for i in range(0, len(words), 12):
        s = " ".join(words[i : i + 12])
        out.append(s[:1].upper() + s[1:] + ".")
    return " ".join(out)


def make_dataset(n: int, seed: int = 0, n_test: int = 1000):
    g = Gen(seed)
    counts = {k: int(round(v * n)) for k, v in SHARES.items()}
    counts["base"] += n - sum(counts.values())
    test_prompts = [" ".join(g.instruction()) + "?" for _ in range(n_test)]
    n_earlier = max(500, n // 20)
    earlier_words = [(g.instruction(), g.response()) for _ in range(n_earlier)]
    earlier = [{"id": f"old{j}", "instruction": " ".join(i), "response": render(r)} for j, (i, r) in enumerate(earlier_words)]

    items = []  # (instruction, response, category, cluster)
    bases = []
    for c in range(counts["base"]):
        ins, resp = g.instruction(), g.response()
        bases.append((ins, resp))
        items.append((" ".join(ins), render(resp), "base", c))
    for _ in range(counts["hard_neg"]):
        c = int(g.rng.integers(len(bases)))
        ins, resp = bases[c]
        keep = int(len(resp) * 0.4)
        items.append((" ".join(ins[:-3] + g.sample(3)), render(resp[:keep] + g.response(len(resp) - keep)), "hard_neg", None))
    near_texts = []
    for _ in range(counts["near"]):
        c = int(g.rng.integers(len(bases)))
        ins, resp = bases[c]
        k = int(g.rng.integers(1, 3))
        if g.rng.random() < 0.25:
            ins = g.edit(ins, k)
        else:
            resp = g.edit(resp, k)
        items.append((" ".join(ins), render(resp), "near", c))
        near_texts.append((items[-1][0], items[-1][1], c))
    for _ in range(counts["exact"]):
        if near_texts and g.rng.random() < 0.3:
            ins, resp, c = near_texts[int(g.rng.integers(len(near_texts)))]
        else:
            c = int(g.rng.integers(len(bases)))
            ins, resp = " ".join(bases[c][0]), render(bases[c][1])
        items.append((g.recase(ins), g.recase(resp), "exact", c))
    for _ in range(counts["earlier"]):
        j = int(g.rng.integers(n_earlier))
        ins, resp = earlier_words[j]
        items.append((" ".join(ins), render(g.edit(resp, int(g.rng.integers(0, 3)))), "earlier", None))
    for _ in range(counts["leak"]):
        words = test_prompts[int(g.rng.integers(n_test))].split()
        r = g.rng.random()
        if r < 1 / 3:
            ins = g.recase(" ".join(words))
        elif r < 2 / 3:
            ins = " ".join(words + g.sample(1))
        else:
            ins = " ".join(g.edit(words, 1))
        items.append((ins, render(g.response()), "leak", None))

    order = g.rng.permutation(len(items))
    pairs, category, truth = [], [], set()
    first_of_cluster = {}
    for new_idx, old_idx in enumerate(order):
        ins, resp, cat, cluster = items[old_idx]
        pairs.append({"id": f"p{new_idx}", "instruction": ins, "response": resp})
        category.append(cat)
        if cat in ("earlier", "leak"):
            truth.add(new_idx)
        elif cluster is not None:
            if cluster in first_of_cluster:
                truth.add(new_idx)
            else:
                first_of_cluster[cluster] = new_idx
    return pairs, earlier, test_prompts, category, truth


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(n: int, weights: tuple[float, float], seed: int, leak_k=None) -> dict:
    from llamaduo_nb.methods.near_duplicates import deduplicate
    from llamaduo_nb.core.params import DeduplicateParams

    t0 = time.perf_counter()
    pairs, earlier, test_prompts, category, truth = make_dataset(n, seed)
    t_gen = time.perf_counter() - t0
    rss_before = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    out = deduplicate(pairs, DeduplicateParams(), earlier=earlier, test_prompts=test_prompts, progress=False, lsh_weights=weights, **leak_k)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    removed = {int(r["id"][1:]) for r in out.removed}
    tp = len(removed & truth)
    by_cat = {}
    for cat in SHARES:
        idx = {i for i, c in enumerate(category) if c == cat}
        t = idx & truth
        by_cat[cat] = {"n": len(idx), "truth": len(t), "removed": len(idx & removed), "removed_true": len(t & removed)}
    reasons = {}
    for r in out.removed:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "n": n,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "gen_seconds": t_gen,
        "peak_rss_mb": peak,
        "rss_before_mb": rss_before,
        "removed": len(removed),
        "truth": len(truth),
        "precision": tp / len(removed) if removed else 1.0,
        "recall": tp / len(truth) if truth else 1.0,
        "by_category": by_cat,
        "reasons": reasons,
        "funnel": out.funnel,
        "stats": out.stats,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    ap.add_argument("--lsh-weights", default=None, help="false-positive,false-negative weights (default: the module's)")
    ap.add_argument("--leakage-shingle-size", type=int, default=None, help="words per shingle of the leakage index (0: params' shingle_size; default: the module's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = ap.parse_args(argv)
    if args.lsh_weights:
        weights = tuple(float(x) for x in args.lsh_weights.split(","))
    else:
        from llamaduo_nb.methods.near_duplicates import LSH_WEIGHTS

        weights = LSH_WEIGHTS
    if args.one:
        leak_k = {} if args.leakage_shingle_size is None else {"leakage_shingle_size": args.leakage_shingle_size or None}
        print(json.dumps(run_one(args.one, weights, args.seed, leak_k)))
        return 0

    print(f"lsh weights (fp, fn) = {weights}; leakage shingle size = {args.leakage_shingle_size}; cpus = {os.cpu_count()}; load avg {os.getloadavg()[0]:.2f}")
    head = f"{'N':>8} {'sec':>7} {'x(prev)':>7} {'cpu s':>7} {'x(prev)':>7} {'peakMB':>7} {'+MB':>6} {'removed':>8} {'truth':>8} {'prec':>6} {'recall':>6}  tok/minhash/filter s   cand   lcs"
    print(head)
    results, prev = [], None
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--seed", str(args.seed), "--lsh-weights", ",".join(map(str, weights))]
        if args.leakage_shingle_size is not None:
            cmd += ["--leakage-shingle-size", str(args.leakage_shingle_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        doubled = prev and r["n"] == 2 * prev["n"]
        ratio = r["seconds"] / prev["seconds"] if doubled else float("nan")
        cpu_ratio = r["cpu_seconds"] / prev["cpu_seconds"] if doubled else float("nan")
        r["ratio_vs_half"], r["cpu_ratio_vs_half"] = ratio, cpu_ratio
        s = r["stats"]
        print(
            f"{n:>8} {r['seconds']:>7.1f} {ratio:>7.2f} {r['cpu_seconds']:>7.1f} {cpu_ratio:>7.2f} "
            f"{r['peak_rss_mb']:>7.0f} {r['peak_rss_mb'] - r['rss_before_mb']:>6.0f} "
            f"{r['removed']:>8} {r['truth']:>8} {r['precision']:>6.4f} {r['recall']:>6.4f}  "
            f"{s['seconds_tokenize']:.1f}/{s['seconds_minhash']:.1f}/{s['seconds_filter']:.1f}  {s['candidates']:>7} {s['lcs_computed']:>7}",
            flush=True,
        )
        results.append(r)
        prev = r
    print("\nrecall by category (removed_true / truth), last size:")
    for cat, c in results[-1]["by_category"].items():
        extra = f", kept-as-should {c['n'] - c['truth'] - (c['removed'] - c['removed_true'])}/{c['n'] - c['truth']}"
        print(f"  {cat:9s} n={c['n']:>7} truth={c['truth']:>7} removed_true={c['removed_true']:>7}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
