"""The one verdict (`methods/verdict.py`), its planner and noise split (`methods/planning.py`), on hand-made fixtures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llamaduo_nb.stages import evaluate
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.methods import planning, verdict
from llamaduo_nb.pipeline import cycle
from llamaduo_nb.core.params import Params
from llamaduo_nb.stages import deploy, report

from .verdict_simulation import paired

PROMPTS = [f"p{i}" for i in range(8)]
SERVICE = "service:openai:gpt-4o"


def answers(name: str, volume: int, values, task: str = "closed_qa", cycle_: int = 1, k: int = 2) -> pd.DataFrame:
    """Answer scores: K answers per prompt, answer j of prompt i scoring values[i] ± 2."""
    rows = []
    for prompt, value in zip(PROMPTS, values):
        for j in range(k):
            score = None if value is None else float(value) + (2.0 if j else -2.0)
            rows.append({"task": task, "local_model": name, "judge": "j", "metric": "precision", "cycle": cycle_,
                         "volume": volume, "prompt_id": prompt, "k": j, "score": score})
    return pd.DataFrame(rows)


SERVICE_VALUES = [60, 70, 55, 80, 65, 75, 50, 85]


def relative(margin: float = 5.0, alpha: float = 0.025) -> verdict.Rule:
    return verdict.Rule(metric="precision", statistic="mean", judge="j", versus_service=True, offset=-margin, alpha=alpha)


def test_not_worse_within_the_margin_and_not_shown_beyond_it():
    service = answers(SERVICE, -1, SERVICE_VALUES)
    close = answers("m", 16, [v - 1 + (i % 3) for i, v in enumerate(SERVICE_VALUES)])  # about 0 behind on every prompt
    result = verdict.decide(close, service, relative(5.0), k=2, m=3)
    assert result.outcome == verdict.PASS_RELATIVE and result.passed
    assert result.low > -5 and result.estimate == pytest.approx(0.0, abs=1.0)
    assert "local − service" in result.interval_text() and "95% CI" in result.interval_text()
    assert result.design_text() == "n = 8 prompts, K = 2, M = 3"
    behind = answers("m", 4, [v - 8 + (i % 3) for i, v in enumerate(SERVICE_VALUES)])  # 8 points behind
    assert verdict.decide(behind, service, relative(5.0)).outcome == verdict.NOT_SHOWN
    # δ = 0: equal is not "not worse"; the local model must be shown better
    assert verdict.decide(close, service, relative(0.0)).outcome == verdict.NOT_SHOWN
    assert "must be shown better" in relative(0.0).describe()


def test_an_absolute_target_is_a_one_sided_test_of_the_statistic():
    rule = verdict.Rule(metric="precision", statistic="mean", judge="j", versus_service=False, threshold=60.0)
    high = verdict.decide(answers("m", 16, [80, 85, 78, 90, 82, 88, 79, 84]), None, rule)
    assert high.outcome == verdict.PASS_ABSOLUTE and high.low >= 60
    near = verdict.decide(answers("m", 16, [50, 75, 58, 70, 62, 66, 52, 71]), None, rule)
    assert near.estimate > 60 and near.outcome == verdict.NOT_SHOWN  # above the threshold, not shown to be
    coverage = verdict.Rule(metric="precision", statistic="coverage_50", judge="j", versus_service=False, threshold=40.0)
    assert verdict.decide(answers("m", 16, [80, 20, 60, 70, 30, 90, 55, 10]), None, coverage).estimate == pytest.approx(62.5)


def test_too_few_prompts_is_a_verdict_never_a_zero_width_interval():
    service = answers(SERVICE, -1, SERVICE_VALUES)
    one = verdict.decide(answers("m", 16, SERVICE_VALUES)[lambda f: f["prompt_id"] == "p0"], service, relative())
    assert one.outcome == verdict.UNDECIDED and one.prompts == 1 and "no spread" in one.reason
    same = verdict.decide(answers("m", 16, [v + 10 for v in SERVICE_VALUES]), service, relative())  # +10 on every prompt
    assert same.outcome == verdict.UNDECIDED and "same value" in same.reason and np.isnan(same.low)
    nothing = verdict.decide(answers("m", 16, SERVICE_VALUES), None, relative())
    assert nothing.outcome == verdict.UNDECIDED and "did not answer" in nothing.reason


def test_failures_score_zero_and_the_verdict_without_them_is_shown():
    values = [v + 6 + (i % 3) for i, v in enumerate(SERVICE_VALUES)]
    service = answers(SERVICE, -1, SERVICE_VALUES)
    local = answers("m", 16, values)
    clean = verdict.decide(local, service, relative())
    broken = local.copy()
    broken.loc[broken["prompt_id"].isin(["p1", "p2", "p3"]), "score"] = None  # the judge could not score these answers
    result = verdict.decide(broken, service, relative())
    assert result.failed_local == 6 and result.estimate < clean.estimate  # unscored answers never raise a score
    assert result.outcome == verdict.NOT_SHOWN and result.outcome_if_dropped == verdict.PASS_RELATIVE
    assert "scored 0; with them dropped: not worse" in result.failures_text()
    refusing = service.copy()
    refusing.loc[refusing["prompt_id"] == "p4", "score"] = None  # a service LLM that refuses scores lower, not higher
    assert verdict.decide(local, refusing, relative()).estimate > clean.estimate


def scores_fixture() -> pd.DataFrame:
    """A run's answer scores: the service LLM, the base model and volumes 4, 16, 64 of cycle 1, 128 of cycle 2;
    not worse from 16 up."""
    gaps = {0: -30, 4: -20, 16: 1, 64: 2, 128: 3}
    frames = [answers(SERVICE, -1, SERVICE_VALUES)]
    for volume, gap in gaps.items():
        frames.append(answers("smol", volume, [v + gap + (i % 3) for i, v in enumerate(SERVICE_VALUES)], cycle_=2 if volume == 128 else 1))
    frames.append(answers("smol", 0, [v - 30 + (i % 3) for i, v in enumerate(SERVICE_VALUES)], cycle_=2))  # the base, answered again
    return pd.concat(frames, ignore_index=True)


def test_the_fixed_sequence_tests_the_largest_volume_first_and_stops_at_the_first_failure():
    table = verdict.verdict_table(scores_fixture(), relative(), k=2, m=1)
    by_volume = table.set_index("volume")
    assert list(table["volume"]) == [0, 4, 16, 64, 128]  # the base model once, its first cycle
    assert by_volume.loc[128, "sequence"] == verdict.PASSED and by_volume.loc[16, "sequence"] == verdict.PASSED
    assert by_volume.loc[4, "sequence"] == verdict.FAILED and by_volume.loc[0, "sequence"] == verdict.NOT_REACHED
    assert list(table.loc[table["chosen"], "volume"]) == [16]
    # a largest volume that does not pass stops the sequence: nothing smaller is chosen, even volumes that would pass
    worse = scores_fixture()
    worse.loc[(worse["volume"] == 128), "score"] -= 40
    table = verdict.verdict_table(worse, relative())
    assert not table["chosen"].any() and (table.loc[table["volume"] < 128, "sequence"] == verdict.NOT_REACHED).all()


def params(**cycle_fields) -> Params:
    return Params(tasks=["closed_qa"], service={"backend": "openai", "model": "gpt-4o"},
                  evaluate={"judges": [{"backend": "openai", "model": "gpt-4o", "name": "j"}], "m": 1},
                  finetune={"base_models": ["smol"], "volumes": [4, 16, 64]}, infer={"k": 2},
                  cycle={"target": "precision mean >= service - 5", "max_cycles": 3, **cycle_fields})


def test_the_stop_rule_deploy_and_the_report_name_the_same_volume(tmp_path):
    p = params()
    scores = scores_fixture()
    table = verdict.verdict_table(scores, evaluate.verdict_rule(p), p.infer.k, p.evaluate.m, p.service.label)
    decision = cycle.decide(p, 2, table)
    assert decision.met and decision.stop
    (chosen,) = deploy.choose_cells(table, p)
    assert (chosen["volume"], chosen["cycle"], chosen["met"]) == (16, 1, True)
    (tmp_path / "report").mkdir()
    table.to_csv(tmp_path / "report" / report.VERDICTS_CSV, index=False)
    lines = report.headline(p, tmp_path)
    assert lines[0].startswith("Rule: precision mean ≥ service − 5: non-inferiority margin δ = 5 points, one-sided α = 0.025")
    assert "16 training samples is the smallest volume not worse than the service LLM (openai:gpt-4o)" in lines[1]
    assert "16 training samples is the smallest volume not worse" in decision.reason  # the same sentence
    assert lines[1] in decision.reason
    assert "Planner" in lines[2] and "needs" in lines[2]
    # cycle 1 alone: its largest volume (64) passes, the sequence goes down to 16
    assert cycle.decide(p, 1, table[table["cycle"] == 1]).met


def test_the_stop_rule_goes_on_when_the_target_is_not_shown():
    p = params()
    scores = scores_fixture()
    scores = scores[scores["volume"].isin([-1, 0, 4])]
    table = verdict.verdict_table(scores, evaluate.verdict_rule(p), 2, 1, p.service.label)
    decision = cycle.decide(p, 1, table, new_pairs=None)
    assert not decision.stop and "no volume is shown to be not worse" in decision.reason
    assert decision.scores[0]["volume"] == 4 and decision.scores[0]["outcome"] == verdict.NOT_SHOWN


def test_a_median_target_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="coverage_<t> >= 50"):
        Params(cycle={"target": "precision median >= 60"})


def test_equivalence_is_shown_refuted_or_not_shown():
    base = answers("m", 16, SERVICE_VALUES)
    close = answers("m", 16, [v + (i % 3) - 1 for i, v in enumerate(SERVICE_VALUES)])
    assert verdict.equivalence(close, base, margin=5).outcome == verdict.EQUIVALENT
    shifted = answers("m", 16, [v - 12 + (i % 3) for i, v in enumerate(SERVICE_VALUES)])
    assert verdict.equivalence(shifted, base, margin=5).outcome == verdict.DIFFERENT
    noisy = answers("m", 16, [v + d for v, d in zip(SERVICE_VALUES, [9, -8, 7, -9, 8, -7, 9, -8])])
    result = verdict.equivalence(noisy[noisy["prompt_id"].isin(PROMPTS[:3])], base, margin=5)
    assert result.outcome == verdict.NOT_SHOWN_EQUIVALENT and "too few prompts" in result.text()
    assert deploy.parity_outcome(pd.DataFrame([{"equivalence": verdict.EQUIVALENT, "margin": 5.0, "equivalence_text": "a"},
                                               {"equivalence": verdict.NOT_SHOWN_EQUIVALENT, "margin": 5.0, "equivalence_text": "b"}])
                                 ).startswith("not shown equivalent (too few prompts)")


def test_the_planner_needs_more_prompts_for_a_smaller_margin():
    assert planning.prompts_needed(13.0, 5.0, 0.025) > planning.prompts_needed(13.0, 10.0, 0.025) > 2
    assert planning.prompts_needed(13.0, 0.0, 0.025) is None
    assert planning.resolvable(13.0, 6, 0.025) > planning.resolvable(13.0, 100, 0.025) > 0
    assert np.isnan(planning.resolvable(13.0, 1, 0.025))
    # the planner's n gives 80 % power, checked by simulation with the t-test itself
    n = planning.prompts_needed(10.0, 5.0, 0.025)
    rng = np.random.default_rng(0)
    d = rng.normal(0.0, 10.0, (2000, n))
    lows = np.array([verdict.t_interval(row, 0.025, -5.0).low for row in d])
    assert 0.76 <= np.mean(lows >= -5.0) <= 0.86
    line = planning.planner_line(relative(5.0), None, 6, "")
    assert "assumed, no pilot yet" in line and "with 6 prompts the smallest difference this run can resolve is ±" in line


def test_variance_components_recover_a_known_design():
    """Nested components from judgement-level data of a simulated cell (known sd: prompts 15, answers 12, judge 8)."""
    rng = np.random.default_rng(1)
    n, k, m = 400, 4, 3
    prompt = rng.normal(0, 15, (n, 1, 1))
    answer = rng.normal(0, 12, (n, k, 1))
    value = 50 + prompt + answer + rng.normal(0, 8, (n, k, m))
    frame = pd.DataFrame({"prompt_id": np.repeat(np.arange(n), k * m), "k": np.tile(np.repeat(np.arange(k), m), n),
                          "value": value.ravel()})
    parts = planning.components(frame)
    assert parts["judgement"] == pytest.approx(64, rel=0.1)
    assert parts["answer"] == pytest.approx(144, rel=0.15)
    assert parts["prompt"] == pytest.approx(225, rel=0.2)
    paired_parts = planning.paired_components(frame, None, 0.025)
    assert paired_parts["share_prompt"] > paired_parts["share_answer"] > paired_parts["share_judgement"]
    assert paired_parts["half_width_2n"] < paired_parts["half_width"]
    assert "doubling the prompts" in planning.advice(paired_parts)


def test_variance_of_a_paired_difference_is_mostly_answer_noise_when_difficulty_is_shared():
    rng = np.random.default_rng(2)
    d_mean, _ = paired(rng, 1, 200, 50.0, 0.0)
    assert d_mean.std() < 15  # the shared prompt difficulty cancels
