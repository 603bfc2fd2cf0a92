"""Threshold rules: the conformal bound holds, the recall rule, intervals, and stored calibrations checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectscope.thresholds import (
    Calibration,
    calibrate,
    chosen_rule,
    conformal_rank,
    defects_needed,
    held_out_needed,
    rate_interval,
    recall_rank,
)


@pytest.mark.parametrize(
    "n, rate, k", [(19, 0.05, 19), (21, 0.05, 21), (99, 0.01, 99), (100, 0.1, 91), (76, 0.05, 74), (9, 0.1, 9)]
)
def test_conformal_rank_is_ceil_of_n_plus_one_times_one_minus_rate(n: int, rate: float, k: int) -> None:
    assert conformal_rank(n, rate) == k == math.ceil(round((n + 1) * (1 - rate), 9))
    scores = np.random.default_rng(n).normal(size=n)
    cal = calibrate(scores, rule="conformal", false_alarm_rate=rate)
    assert cal.threshold == np.sort(scores)[k - 1] and not cal.notes
    assert cal.false_alarm_bound == pytest.approx((n + 1 - k) / (n + 1)) and cal.false_alarm_bound <= rate


def test_too_few_held_out_images_says_so_and_what_is_needed() -> None:
    assert held_out_needed(0.05) == 19 and held_out_needed(0.01) == 99 and held_out_needed(0.1) == 9
    cal = calibrate([1.0, 3.0, 2.0], rule="conformal", false_alarm_rate=0.05)
    assert cal.threshold == 3.0 and cal.false_alarm_bound == 0.25
    (note,) = cal.notes
    assert "3 held-out good image(s) cannot support a false-alarm rate of 0.05" in note and "at least 19" in note
    assert calibrate(np.arange(19.0), rule="conformal", false_alarm_rate=0.05).notes == ()


def test_conformal_false_alarm_rate_is_bounded_and_tight_on_exchangeable_data() -> None:
    """Averaged over many calibration sets, the rate of new good scores above the threshold lies in
    [A - 1/(n+1), A]: an off-by-one in the rank would leave that interval."""
    rng = np.random.default_rng(0)
    n, rate, trials = 40, 0.1, 4000
    calibration_sets = rng.gamma(2.0, size=(trials, n))
    new_scores = rng.gamma(2.0, size=(trials, 200))
    rates = [
        float((new > calibrate(held, rule="conformal", false_alarm_rate=rate).threshold).mean())
        for held, new in zip(calibration_sets, new_scores)
    ]
    measured = float(np.mean(rates))
    noise = 3 * float(np.std(rates)) / math.sqrt(trials)
    assert rate - 1 / (n + 1) - noise <= measured <= rate + noise, measured
    bound = calibrate(calibration_sets[0], rule="conformal", false_alarm_rate=rate).false_alarm_bound
    assert measured <= bound + noise


def test_mean_sigma_rule_is_unchanged() -> None:
    scores = np.array([1.0, 2.0, 3.0, 2.0])
    cal = calibrate(scores, rule="mean_sigma", sigmas=3.0)
    assert cal.threshold == pytest.approx(2.0 + 3.0 * np.std(scores, ddof=1))
    assert cal.mean == 2.0 and cal.max == 3.0 and cal.false_alarm_bound == pytest.approx(1 / 5)
    assert calibrate([1.0, 1.0, 5.0], rule="mean_sigma", sigmas=0.0).threshold == 5.0
    assert calibrate([5.0], rule="mean_sigma").threshold == 5.0
    with pytest.raises(ValueError, match="at least one held-out good image"):
        calibrate([])


def test_recall_rule_bounds_the_miss_rate() -> None:
    assert recall_rank(19, 0.95) == 1 and recall_rank(39, 0.95) == 2 and recall_rank(18, 0.95) == 0
    assert defects_needed(0.95) == 19 and defects_needed(0.9) == 9
    defects = np.linspace(10.0, 20.0, 39)
    cal = calibrate(np.arange(10.0), rule="recall", target_recall=0.95, defect_scores=defects)
    assert cal.threshold == defects[1] and cal.miss_bound == pytest.approx(2 / 40)
    assert cal.miss_estimate is None  # the defects set it: not an estimate of its misses
    assert cal.held_out_false_alarms is not None and cal.held_out_false_alarms.count == 0
    with pytest.raises(ValueError, match="cannot support a target recall of 0.95 .*at least 19"):
        calibrate([1.0, 2.0], rule="recall", target_recall=0.95, defect_scores=[5.0] * 10)


def test_recall_rule_miss_rate_bound_holds_on_exchangeable_defects() -> None:
    rng = np.random.default_rng(1)
    m, recall, trials = 29, 0.9, 3000
    misses = []
    for _ in range(trials):
        cal = calibrate([0.0], rule="recall", target_recall=recall, defect_scores=rng.normal(5, 1, m))
        misses.append(float((rng.normal(5, 1, 100) <= cal.threshold).mean()))
    assert float(np.mean(misses)) <= 1 - recall + 0.005


def test_held_out_defects_give_a_miss_estimate_with_an_exact_interval() -> None:
    cal = calibrate([1.0, 2.0, 3.0] * 10, rule="conformal", false_alarm_rate=0.1, defect_scores=[2.5, 4.0, 5.0, 6.0])
    miss = cal.miss_estimate
    assert miss is not None and (miss.count, miss.n) == (1, 4) and miss.rate == 0.25
    low, high = miss.interval
    assert low == pytest.approx(1 - 0.975 ** (1 / 4))  # Beta(1, 4) quantile in closed form
    assert 0.25 < high < 1
    assert "held-out defects missed: 25.0% (1/4" in cal.describe()


def test_rate_interval_matches_the_closed_forms() -> None:
    low, high = rate_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 20))
    low, high = rate_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 20))
    assert rate_interval(0, 0) == (0.0, 1.0)


def test_chosen_rule_follows_the_setting_and_refuses_a_mix() -> None:
    assert chosen_rule(None, {"false_alarm_rate": 0.01}) == "conformal"
    assert chosen_rule(None, {"target_recall": 0.9}) == "recall"
    assert chosen_rule("mean_sigma", {"threshold_sigmas": 2.0}) == "mean_sigma"
    assert chosen_rule(None, {}) is None
    with pytest.raises(ValueError, match="each rule has its own setting"):
        chosen_rule("mean_sigma", {"false_alarm_rate": 0.01})
    with pytest.raises(ValueError, match="each rule has its own setting"):
        chosen_rule(None, {"false_alarm_rate": 0.01, "target_recall": 0.9})


@pytest.mark.parametrize(
    "rule, setting", [("conformal", {"false_alarm_rate": 0.1}), ("mean_sigma", {"sigmas": 2.0}), ("recall", {})]
)
def test_stored_calibration_round_trips(rule: str, setting: dict) -> None:
    cal = calibrate(
        np.linspace(1, 2, 30), rule=rule, defect_scores=np.linspace(1.5, 5, 20), target_recall=0.9, **setting
    )
    assert Calibration.from_dict(cal.to_dict(), nonnegative_scores=True) == cal


def _stored() -> dict:
    return calibrate(np.linspace(1, 2, 30), rule="conformal", false_alarm_rate=0.1).to_dict()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(threshold=d["good_scores"][-1]), "calibration.threshold"),
        (lambda d: d["good_scores"].reverse(), "ascending"),
        (lambda d: d["good_scores"].pop(), "n_images says 30"),
        (lambda d: d["good_scores"].__setitem__(0, float("nan")), "good_scores[0]"),
        (lambda d: d["good_scores"].__setitem__(0, -1.0), "negative"),
        (lambda d: d.update(false_alarm_rate=1.5), "false_alarm_rate must be between 0 and 1"),
        (lambda d: d.pop("good_scores"), "calibration.good_scores: missing"),
        (lambda d: d.update(sigmas=3.0), "calibration.sigmas: unknown field for rule conformal"),
        (lambda d: d.update(good_scores="1,2"), "must be a list"),
    ],
)
def test_tampered_conformal_calibration_is_refused(edit, needle: str) -> None:
    data = _stored()
    edit(data)
    with pytest.raises(ValueError) as info:
        Calibration.from_dict(data, nonnegative_scores=True)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_non_finite_held_out_scores_refuse_calibration() -> None:
    with pytest.raises(ValueError, match="1 score.* not finite"):
        calibrate([1.0, float("inf"), 2.0])


def test_false_alarm_range_covers_the_rate_of_each_calibration_set() -> None:
    """With uniform scores the true false-alarm rate of a threshold t is 1 - t: about 95 % of
    calibration sets must have it inside their stated range."""
    rng = np.random.default_rng(2)
    inside = []
    for _ in range(2000):
        cal = calibrate(rng.uniform(size=60), rule="conformal", false_alarm_rate=0.1)
        low, high = cal.false_alarm_range
        inside.append(low <= 1 - cal.threshold <= high)
    assert 0.93 <= float(np.mean(inside)) <= 0.97
    assert "95% range for this calibration" in cal.describe()


def test_confidence_keeps_the_rate_of_most_calibration_sets_under_the_target() -> None:
    """With confidence C, at most about 1 - C of calibration sets may have a true rate above A
    (uniform scores: the true rate of threshold t is 1 - t); without it, many more do."""
    rng = np.random.default_rng(3)
    n, rate, confidence = 200, 0.05, 0.9
    above_confident, above_marginal = [], []
    for _ in range(2000):
        held = rng.uniform(size=n)
        above_confident.append(1 - calibrate(held, false_alarm_rate=rate, confidence=confidence).threshold > rate)
        above_marginal.append(1 - calibrate(held, false_alarm_rate=rate).threshold > rate)
    assert float(np.mean(above_confident)) <= 1 - confidence + 0.02
    assert float(np.mean(above_marginal)) > 0.3
    cal = calibrate(rng.uniform(size=n), false_alarm_rate=rate, confidence=confidence)
    assert cal.n_below > conformal_rank(n, rate) and "with 90% confidence" in cal.describe()
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_too_few_images_for_the_confidence_say_how_many_are_needed() -> None:
    cal = calibrate(np.arange(21.0), false_alarm_rate=0.05, confidence=0.9)
    assert cal.threshold == 20.0 and "at least 45" in cal.notes[0]  # (1 - 0.05)^45 <= 0.1
    with pytest.raises(ValueError, match="false_alarm_confidence must be between 0 and 1"):
        calibrate([1.0], confidence=1.0)
    assert chosen_rule(None, {"false_alarm_confidence": 0.9}) == "conformal"
    with pytest.raises(ValueError, match="each rule has its own setting"):
        chosen_rule("mean_sigma", {"false_alarm_confidence": 0.9})
