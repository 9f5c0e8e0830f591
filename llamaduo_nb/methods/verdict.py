"""The one verdict: is the local model as good as the service LLM (or does it meet an absolute target)?

Every place that answers the question calls this module: the cycle's stop rule, deploy's choice of cell,
the report's headline, table and figure, the widgets and `cycles.json`.

**The test.** Per test prompt i, each side's value is the mean of its K answer scores (statistic `mean`) or
the % of its K answers scoring at least ζ (`coverage_ζ`); an answer's score is the mean of its M valid
judgements. For a target relative to the service LLM (`precision mean >= service - 5`) the per-prompt
difference is d_i = local_i − scale × service_i, and "not worse" is the one-sided non-inferiority test of
H0: E[d] ≤ offset (= −δ, the margin; `>= service` means δ = 0, which asks the local model to be shown
*better*). For an absolute target (`precision coverage_50 >= 80`) d_i = local_i and H0: E[d] < threshold.
H0 is rejected at one-sided level α (`cycle.alpha`, default 0.025) when the lower bound of the two-sided
(1 − 2α) interval of E[d] reaches the bound: the interval printed and the test are the same object.

**Why a t-interval on per-prompt values.** The test prompt is the unit of independence: the K answers of a
prompt and the M judgements of an answer share the prompt's difficulty, so the prompt is the cluster
(Miller, "Adding Error Bars to Evals", arXiv 2411.00640, clustered standard errors: with one value per
cluster the clustered SE is the SE of the per-prompt values). Pairing takes each prompt's difficulty out of
the comparison. Student's t with n − 1 degrees of freedom (`scipy.stats.ttest_1samp`) is chosen over a
bootstrap because it is honest at the sizes researchers use: measured by simulation (tests/test_verdict_
simulation.py, docs/MEASUREMENTS.md), the percentile bootstrap of the mean difference covers the truth in
~85 % (mean) and ~65 % (coverage_50) of experiments at 6 prompts, the t-interval in 93–97 % for the mean at
6, 20 and 100 prompts and for coverage_ζ at 20 and 100; at 6 prompts with K = 2 a per-prompt coverage takes
three values and the t-interval is conservative (over-covers).

**No verdict without an interval.** Fewer than 2 prompts, or prompts that all gave the same difference (a
zero-width interval: the spread is unknown, not zero), give the verdict "too few prompts to decide".

**Failures count.** An answer with no valid judgement (the judge failed on it, or the service LLM gave no
answer) is scored 0 (`FAILURE_SCORE`): a side that fails more never scores higher. The counts are in every
verdict, and so is the verdict with the failures dropped instead.

**Choosing the smallest volume.** Testing every volume at α and taking the smallest pass inflates the
error. The volumes of a (task, local model) are tested in a fixed sequence, largest first, each at the full
α, stopping at the first that does not pass (fixed-sequence testing: the family-wise error stays ≤ α
because a hypothesis is tested only when every one before it was rejected). The chosen volume is the
smallest of the unbroken run of passes; the base model (volume 0) is the last in the sequence.

**The volume search** (`finetune.volumes: search`, pipeline/search.py) cannot go largest first: not training the
large volumes is its point. It tries volumes smallest first (the base model, then the grid) and stops at the first
that passes, each test at α / L, L being every look it could ever make (the base model, each grid volume, each
later cycle). Bonferroni's bound then holds whatever the order, the scores' correlation across volumes (the same
test prompts) and the shape of the score curve: the chosen volume is truly worse than the margin only if one of
at most L tests of a true H0 rejects, each with probability ≤ α / L. The price is a stricter test per look (wider
intervals: 99.4 % for the paper's 9 volumes); a fixed sequence at full α needs the largest volume trained first.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from llamaduo_nb.core.rows import is_service, with_cycle

ALPHA = 0.025  # one-sided; the printed interval is the two-sided 1 − 2α = 95 % one
FAILURE_SCORE = 0.0  # an answer that failed or could not be judged: the worst score
METHOD = "paired t-interval over test prompts"
ABSOLUTE_METHOD = "t-interval over test prompts"

PASS_RELATIVE, PASS_ABSOLUTE, NOT_SHOWN, UNDECIDED = "not worse", "meets the target", "not shown", "too few prompts to decide"
# the fixed sequence, per cell
PASSED, FAILED, NOT_REACHED = "passed", "stopped here", "not reached"
# the volume search, per cell: tried and not passed (the search went on), or trained but not needed (after the pass)
WENT_ON, NOT_NEEDED = "went on", "not needed"


@dataclass(frozen=True)
class Rule:
    """What is decided: the target's metric and statistic, its judge, and the bound the one-sided test is against."""

    metric: str = "precision"
    statistic: str = "mean"
    judge: str | None = None
    versus_service: bool = True
    threshold: float = 70.0  # an absolute target
    scale: float = 1.0  # relative: local − scale × service …
    offset: float = 0.0  # … must exceed offset (= −δ)
    alpha: float = ALPHA  # the error of the whole decision (one-sided)
    looks: int = 1  # > 1: the volume search, smallest first, each of its `looks` possible tests at alpha / looks

    @classmethod
    def from_target(cls, target, alpha: float = ALPHA, judge: str | None = None, looks: int = 1) -> "Rule":
        """From a `CycleTarget` (or anything with its fields); `judge`: the default when the target names none."""
        return cls(metric=target.metric, statistic=target.statistic, judge=target.judge or judge,
                   versus_service=target.versus_service, threshold=float(target.threshold),
                   scale=float(target.service_scale) if target.versus_service else 1.0,
                   offset=float(target.service_offset) if target.versus_service else 0.0, alpha=float(alpha), looks=int(looks))

    @property
    def search(self) -> bool:
        return self.looks > 1

    @property
    def test_alpha(self) -> float:
        """The one-sided level of each cell's test: α, or α / L in the volume search (Bonferroni)."""
        return self.alpha / self.looks

    @property
    def level(self) -> float:
        return 1.0 - 2.0 * self.test_alpha

    def alpha_text(self) -> str:
        if not self.search:
            return f"α = {self.alpha:g}"
        return f"α = {self.alpha:g} over the search's {self.looks} possible looks (each at α/{self.looks} = {self.test_alpha:.2g})"

    @property
    def bound(self) -> float:
        """The value the lower bound of the interval must reach."""
        return self.offset if self.versus_service else self.threshold

    @property
    def margin(self) -> float:
        """δ, the non-inferiority margin in points (relative targets with scale 1)."""
        return -self.offset

    @property
    def method(self) -> str:
        return METHOD if self.versus_service else ABSOLUTE_METHOD

    @property
    def passed_word(self) -> str:
        return PASS_RELATIVE if self.versus_service else PASS_ABSOLUTE

    def what(self) -> str:
        return f"{self.metric} {self.statistic}"

    def describe(self) -> str:
        """The rule in one phrase: the target, δ or the threshold, α."""
        if not self.versus_service:
            return f"{self.what()} ≥ {self.threshold:g}: one-sided test against the threshold, {self.alpha_text()} ({self.method})"
        if self.scale != 1:
            rhs = f"{self.scale:g} × service" + (f" {'−' if self.offset < 0 else '+'} {abs(self.offset):g}" if self.offset else "")
            return f"{self.what()} ≥ {rhs}: one-sided non-inferiority test, {self.alpha_text()} ({self.method})"
        if self.margin == 0:
            return (f"{self.what()} ≥ service with margin δ = 0 (the local model must be shown better), "
                    f"one-sided {self.alpha_text()} ({self.method})")
        return (f"{self.what()} ≥ service − {self.margin:g}: non-inferiority margin δ = {self.margin:g} points, "
                f"one-sided {self.alpha_text()} ({self.method})")


# -- per-prompt values ------------------------------------------------------------------------------------
def zeta_of(statistic: str) -> float | None:
    return float(statistic.split("_", 1)[1]) if statistic.startswith("coverage_") else None


def per_prompt(scores: pd.DataFrame, statistic: str = "mean", failures: str = "zero") -> pd.Series:
    """One value per prompt_id from answer scores (columns prompt_id, score; NaN: an answer without a valid
    judgement). `failures`: "zero" scores such answers 0; "drop" leaves them out (a prompt with none left goes)."""
    data = scores[["prompt_id", "score"]]
    if failures == "zero":
        data = data.assign(score=data["score"].astype(float).fillna(FAILURE_SCORE))
    else:
        data = data[data["score"].notna()].assign(score=lambda f: f["score"].astype(float))
    grouped = data.groupby("prompt_id")["score"]
    zeta = zeta_of(statistic)
    if zeta is not None:
        return grouped.apply(lambda s: 100.0 * float(np.mean(s.to_numpy(dtype=float) >= zeta)))
    if statistic != "mean":
        raise ValueError(f"statistic '{statistic}': a verdict is taken on mean or coverage_<ζ>")
    return grouped.mean()


def failed_answers(scores: pd.DataFrame) -> int:
    return int(scores["score"].isna().sum()) if len(scores) else 0


# -- the interval -----------------------------------------------------------------------------------------
@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    sd: float
    p_value: float  # one-sided, H0: mean ≤ bound
    reason: str = ""  # why there is no interval ("" when there is)

    @property
    def decided(self) -> bool:
        return not self.reason


def t_bounds(values: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, decided) of the two-sided (1 − 2α) Student-t interval of the mean of each row of `values`
    (rows: experiments, columns: prompts; the simulation tests call it on thousands of rows at once). A row
    without spread (fewer than 2 values, or all equal) is not decided."""
    x = np.atleast_2d(np.asarray(values, dtype=float))
    n = x.shape[1]
    mean = x.mean(axis=1)
    sd = x.std(axis=1, ddof=1) if n >= 2 else np.full(x.shape[0], np.nan)
    decided = (n >= 2) & (np.ptp(x, axis=1) > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(1.0 - alpha, max(n - 1, 1)) * sd / np.sqrt(n)
    low, high = np.where(decided, mean - half, np.nan), np.where(decided, mean + half, np.nan)
    return low, high, decided


def t_interval(values, alpha: float = ALPHA, bound: float = 0.0) -> Interval:
    """The two-sided (1 − 2α) Student-t interval of the mean of `values` (`t_bounds`) and the one-sided p-value
    of H0: mean ≤ bound (`scipy.stats.ttest_1samp`). No interval from fewer than 2 values or values all equal."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    nan = float("nan")
    estimate = float(x.mean()) if n else nan
    if n < 2:
        return Interval(estimate, nan, nan, n, nan, nan, f"{n} test prompt{'s' if n != 1 else ''}: no spread to measure")
    (low,), (high,), (decided,) = t_bounds(x, alpha)
    if not decided:
        return Interval(estimate, nan, nan, n, 0.0, nan,
                        f"all {n} test prompts gave the same value ({estimate:+.1f}): the spread is unknown, not zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_1samp(x, popmean=bound, alternative="greater").pvalue
    return Interval(estimate, float(low), float(high), n, float(x.std(ddof=1)), float(p))


# -- one cell ------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    rule: Rule
    outcome: str
    estimate: float  # mean of local − scale × service (relative) or of local (absolute)
    low: float
    high: float
    bound: float
    p_value: float
    prompts: int
    local: float
    service: float
    sd: float
    failed_local: int = 0
    failed_service: int = 0
    outcome_if_dropped: str = ""
    reason: str = ""
    k: int | None = None
    m: int | None = None

    @property
    def passed(self) -> bool:
        return self.outcome in (PASS_RELATIVE, PASS_ABSOLUTE)

    def interval_text(self) -> str:
        level = f"{100 * self.rule.level:.3g}% CI"
        if self.outcome == UNDECIDED:
            return f"no interval: {self.reason}"
        if self.rule.versus_service:
            who = "local − service" if self.rule.scale == 1 else f"local − {self.rule.scale:g} × service"
            edge = 100 * max(1.0, self.rule.scale)  # a difference of 0–100 scores cannot leave ±100·scale
            return f"{who} {self.estimate:+.1f} [{level} {max(self.low, -edge):+.1f}, {min(self.high, 100.0):+.1f}]"
        # shown within the scale's 0–100 (the true value lies there, so the clipped interval covers as often); the
        # decision reads the unclipped bound
        return f"{self.rule.statistic} {self.estimate:.1f} [{level} {max(self.low, 0.0):.1f}, {min(self.high, 100.0):.1f}]"

    def design_text(self) -> str:
        parts = [f"n = {self.prompts} prompts"]
        parts += [f"K = {self.k}"] if self.k else []
        parts += [f"M = {self.m}"] if self.m else []
        return ", ".join(parts)

    def failures_text(self) -> str:
        if not (self.failed_local or self.failed_service):
            return ""
        who = []
        if self.failed_local:
            who.append(f"{self.failed_local} local answer{'s' if self.failed_local != 1 else ''} without a valid judgement")
        if self.failed_service:
            who.append(f"{self.failed_service} service answer{'s' if self.failed_service != 1 else ''} failed or unjudged")
        return f"{' and '.join(who)} scored {FAILURE_SCORE:g}; with them dropped: {self.outcome_if_dropped}"

    def as_row(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k != "rule"}
        row.update(passed=self.passed, method=self.rule.method, alpha=self.rule.test_alpha, level=self.rule.level,
                   margin=self.rule.margin if self.rule.versus_service else float("nan"),
                   threshold=float("nan") if self.rule.versus_service else self.rule.threshold,
                   metric=self.rule.metric, statistic=self.rule.statistic)
        return row


def _outcome(rule: Rule, interval: Interval) -> str:
    if not interval.decided:
        return UNDECIDED
    return rule.passed_word if interval.low >= rule.bound else NOT_SHOWN


def _differences(local: pd.DataFrame, service: pd.DataFrame | None, rule: Rule, failures: str):
    a = per_prompt(local, rule.statistic, failures)
    if not rule.versus_service:
        return a.to_numpy(dtype=float), a, None
    b = per_prompt(service, rule.statistic, failures) if service is not None and len(service) else pd.Series(dtype=float)
    common = a.index.intersection(b.index)
    return (a[common] - rule.scale * b[common]).to_numpy(dtype=float), a[common], b[common]


def decide(local: pd.DataFrame, service: pd.DataFrame | None, rule: Rule, k: int | None = None, m: int | None = None) -> Verdict:
    """The verdict of one cell. `local`, `service`: answer scores (columns prompt_id, score; NaN where an answer
    has no valid judgement); `service` is unused for an absolute target."""
    nan = float("nan")
    if rule.versus_service and (service is None or not len(service)):
        return Verdict(rule, UNDECIDED, nan, nan, nan, rule.bound, nan, 0, nan, nan, nan,
                       reason="the service LLM did not answer the test prompts (evaluate.service_answers)", k=k, m=m)
    d, a, b = _differences(local, service, rule, "zero")
    interval = t_interval(d, rule.test_alpha, rule.bound)
    dropped_d, *_ = _differences(local, service, rule, "drop")
    failed_local = failed_answers(local)
    failed_service = failed_answers(service) if rule.versus_service else 0
    dropped = _outcome(rule, t_interval(dropped_d, rule.test_alpha, rule.bound))
    return Verdict(rule, _outcome(rule, interval), interval.estimate, interval.low, interval.high, rule.bound, interval.p_value,
                   interval.n, float(a.mean()) if len(a) else nan, float(b.mean()) if b is not None and len(b) else nan,
                   interval.sd, failed_local, failed_service, dropped if (failed_local or failed_service) else "",
                   interval.reason, k, m)


# -- every cell, and the fixed sequence ------------------------------------------------------------------------
CELL = ["task", "local_model", "cycle", "volume"]


def fixed_sequence(verdicts: list[tuple[dict, Verdict]]) -> tuple[list[str], int | None]:
    """(status of each cell, index of the chosen cell or None). Cells are tested largest volume first (later cycle
    first on a tie), each at the full α, until the first that does not pass."""
    order = sorted(range(len(verdicts)), key=lambda i: (-int(verdicts[i][0]["volume"]), -int(verdicts[i][0]["cycle"])))
    status, chosen, going = [NOT_REACHED] * len(verdicts), None, True
    for i in order:
        if not going:
            continue
        if verdicts[i][1].passed:
            status[i], chosen = PASSED, i
        else:
            status[i], going = FAILED, False
    return status, chosen


def search_sequence(verdicts: list[tuple[dict, Verdict]]) -> tuple[list[str], int | None]:
    """The volume search's reading of the same cells: smallest volume first (the base model, then the grid, then later
    cycles), each test at α / L, the first that passes is chosen; cells after it were not needed."""
    order = sorted(range(len(verdicts)), key=lambda i: (int(verdicts[i][0]["cycle"]), int(verdicts[i][0]["volume"])))
    status, chosen = [NOT_NEEDED] * len(verdicts), None
    for i in order:
        if chosen is not None:
            break
        if verdicts[i][1].passed:
            status[i], chosen = PASSED, i
        else:
            status[i] = WENT_ON
    return status, chosen


def verdict_table(scores: pd.DataFrame, rule: Rule, k: int | None = None, m: int | None = None,
                  service_model: str | None = None) -> pd.DataFrame:
    """One row per (task, local model, cycle, volume): the cell's verdict, its place in the fixed sequence and
    whether it is the chosen (smallest not-worse) volume.

    `scores`: answer scores with columns task, local_model, judge, metric, cycle, volume, prompt_id, k, score
    (NaN for an answer without a valid judgement), the service LLM's rows named by `is_service`. The service
    LLM's answers of its first cycle are the comparison (it answers alike in every cycle)."""
    data = scores[scores["metric"] == rule.metric] if len(scores) else scores
    data = data.assign(cycle=1) if "cycle" not in data.columns else data
    judge = rule.judge or (data.loc[~is_service(data["local_model"]).to_numpy(), "judge"].iloc[0] if len(data) else None)
    data = data[data["judge"] == judge] if len(data) else data
    service_mask = is_service(data["local_model"]).to_numpy() if len(data) else np.zeros(0, dtype=bool)
    service_all, local = data[service_mask], data[~service_mask]
    if len(local):  # the base model answers alike in every cycle: its first cycle's answers are its cell
        first = local[local["volume"] == 0].groupby(["task", "local_model"])["cycle"].transform("min")
        local = local.drop(first[local.loc[first.index, "cycle"] != first].index)
    rows = []
    for (task, model), cells in local.groupby(["task", "local_model"], sort=True):
        service = service_all[service_all["task"] == task]
        service = service[service["cycle"] == service["cycle"].min()] if len(service) else service
        decided = []
        for (cycle, volume), cell in cells.groupby(["cycle", "volume"], sort=True):
            key = {"task": task, "local_model": model, "cycle": int(cycle), "volume": int(volume)}
            decided.append((key, decide(cell, service, rule, k, m)))
        status, chosen = (search_sequence if rule.search else fixed_sequence)(decided)
        for i, (key, verdict) in enumerate(decided):
            rows.append({**key, "judge": judge, **verdict.as_row(), "sequence": status[i], "chosen": i == chosen,
                         "service_model": service_model})
    columns = CELL + ["judge", "metric", "statistic", "outcome", "passed", "sequence", "chosen", "estimate", "low", "high", "bound",
                      "p_value", "prompts", "local", "service", "sd", "failed_local", "failed_service", "outcome_if_dropped",
                      "reason", "k", "m", "method", "alpha", "level", "margin", "threshold", "service_model"]
    return pd.DataFrame(rows, columns=columns)


def _verdict_of(row, rule: Rule) -> Verdict:
    fields = {f: row[f] for f in ("outcome", "estimate", "low", "high", "bound", "p_value", "prompts", "local", "service", "sd",
                                  "failed_local", "failed_service", "outcome_if_dropped", "reason", "k", "m")}
    for name in ("outcome_if_dropped", "reason"):
        fields[name] = "" if pd.isna(fields[name]) else str(fields[name])
    for name in ("k", "m"):
        fields[name] = None if pd.isna(fields[name]) else int(fields[name])
    fields["prompts"], fields["failed_local"], fields["failed_service"] = (int(fields[f]) for f in ("prompts", "failed_local", "failed_service"))
    return Verdict(rule, **fields)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, local model): the chosen cell's row, else the first cell of the sequence (the largest volume)."""
    rows = []
    for _, group in table.groupby(["task", "local_model"], sort=True):
        chosen = group[group["chosen"]]
        first = group.sort_values(["volume", "cycle"], ascending=False).iloc[0]
        row = (chosen.iloc[0] if len(chosen) else first).to_dict()
        row["found"] = bool(len(chosen))
        row["first_volume"], row["first_cycle"] = int(first["volume"]), int(first["cycle"])
        rows.append(row)
    return pd.DataFrame(rows)


def volume_words(volume: int) -> str:
    return "the base model (no fine-tuning)" if int(volume) == 0 else f"{int(volume)} training samples"


def sentence(row, rule: Rule, service_label: str | None = None) -> str:
    """The verdict of a (task, local model) as one sentence, from a `summary` row (every caller prints this one)."""
    verdict = _verdict_of(row, rule)
    who = f"the service LLM ({service_label})" if service_label else "the service LLM"
    head = f"{row['task']} · {row['local_model']}: "
    evidence = f"{verdict.interval_text()}; {verdict.design_text()}"
    if row["found"]:
        where = f"{volume_words(row['volume'])}" + (f" (cycle {int(row['cycle'])})" if int(row["cycle"]) > 1 else "")
        if rule.versus_service:
            text = f"{where} is the smallest volume not worse than {who} on {rule.what()}"
        else:
            text = f"{where} is the smallest volume that meets {rule.what()} ≥ {rule.threshold:g}"
    else:
        where = volume_words(row["volume"]) + (f" (cycle {int(row['cycle'])})" if int(row["cycle"]) > 1 else "")
        if verdict.outcome == UNDECIDED:
            text = f"too few prompts to decide at the largest volume, {where}"
        elif rule.versus_service:
            text = f"no volume is shown to be not worse than {who} on {rule.what()} yet (largest, {where})"
        else:
            text = f"no volume is shown to meet {rule.what()} ≥ {rule.threshold:g} yet (largest, {where})"
    failures = verdict.failures_text()
    return head + text + f" — {evidence}" + (f"; {failures}" if failures else "") + "."


def rule_line(rule: Rule) -> str:
    if rule.search:
        order = (f"volumes tried smallest first, stopping at the first that passes, each test at α/{rule.looks} (Bonferroni: "
                 f"the chosen volume is worse than the target with probability ≤ α)")
    else:
        order = "volumes tested largest first in a fixed sequence (family-wise error ≤ α)"
    return f"Rule: {rule.describe()}; {100 * rule.level:.3g}% intervals; {order}; failed or unjudged answers score {FAILURE_SCORE:g}."


# -- deploy's parity: an equivalence test ----------------------------------------------------------------------
EQUIVALENT, DIFFERENT, NOT_SHOWN_EQUIVALENT = "equivalent", "different", "not shown equivalent"


@dataclass
class Equivalence:
    outcome: str
    estimate: float
    low: float
    high: float
    margin: float
    prompts: int
    sd: float
    reason: str = ""
    level: float = 0.95

    def text(self) -> str:
        ci = (f"served − adapter {self.estimate:+.1f} [{100 * self.level:g}% CI {self.low:+.1f}, {self.high:+.1f}] "
              f"over {self.prompts} prompts") if not self.reason else f"no interval: {self.reason}"
        if self.outcome == EQUIVALENT:
            return f"equivalent within ±{self.margin:g} ({ci})"
        if self.outcome == DIFFERENT:
            return f"different ({ci})"
        return f"not shown equivalent within ±{self.margin:g} (too few prompts: {ci})"


def equivalence(a: pd.DataFrame, b: pd.DataFrame, margin: float, alpha: float = ALPHA, statistic: str = "mean") -> Equivalence:
    """Two one-sided tests (TOST) of E[a_i − b_i] within ±margin, paired over prompts: equivalent when the
    (1 − 2α) interval lies inside (−margin, margin); different when it excludes 0 and is not inside; else not shown."""
    x, y = per_prompt(a, statistic), per_prompt(b, statistic)
    common = x.index.intersection(y.index)
    interval = t_interval((x[common] - y[common]).to_numpy(dtype=float), alpha)
    level = 1.0 - 2.0 * alpha
    if not interval.decided:
        return Equivalence(NOT_SHOWN_EQUIVALENT, interval.estimate, interval.low, interval.high, margin, interval.n, interval.sd,
                           interval.reason, level)
    if -margin < interval.low and interval.high < margin:
        outcome = EQUIVALENT
    elif interval.low > 0 or interval.high < 0:
        outcome = DIFFERENT
    else:
        outcome = NOT_SHOWN_EQUIVALENT
    return Equivalence(outcome, interval.estimate, interval.low, interval.high, margin, interval.n, interval.sd, "", level)


def cycle_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Per (cycle, task, local model): the verdict row of the cycle's largest volume (the first the fixed sequence
    tests once the cycle is done; the base model only where the cycle trained nothing). The across-cycles figure
    and cycles.json read it."""
    if table.empty:
        return table
    data = with_cycle(table)
    trained = data.groupby("cycle")["volume"].transform("max").gt(0)
    data = data[(data["volume"] > 0) | ~trained]
    idx = data.groupby(["cycle", "task", "local_model"], sort=False)["volume"].idxmax()
    return data.loc[idx.to_numpy()].sort_values(["task", "local_model", "cycle"], kind="stable").reset_index(drop=True)


# -- one-sample intervals for the tables and figures ------------------------------------------------------------
def value_interval(scores: pd.DataFrame, statistic: str, alpha: float = ALPHA) -> tuple[float, float]:
    """The (1 − 2α) t-interval of one side's statistic over prompts (failed answers scored 0), clipped to 0–100;
    NaN bounds when it has no spread to measure."""
    interval = t_interval(per_prompt(scores, statistic).to_numpy(dtype=float), alpha)
    if not interval.decided:
        return float("nan"), float("nan")
    return max(0.0, interval.low), min(100.0, interval.high)
