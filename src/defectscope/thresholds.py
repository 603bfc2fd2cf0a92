"""Decision thresholds: the rules that set one from held-out scores, and what each one promises.

Three rules, all from scores of images the model was not fitted on:

- ``conformal`` (the default): split-conformal calibration for a target false-alarm rate A. The
  threshold is the k-th smallest of the n held-out good scores, k = ceil((n + 1)(1 - A)); for a
  new good image exchangeable with them, P(score > threshold) <= 1 - k / (n + 1) <= A. With
  n + 1 < 1 / A no held-out score gives that bound: the threshold is then the highest score and
  the stated bound is 1 / (n + 1), larger than A (:attr:`Calibration.notes` says so).
  With a ``confidence`` C the rank rises to the smallest k whose rate exceeds A with
  probability at most 1 - C for this one calibration set (the rate given the set is
  Beta(n + 1 - k, k) distributed), a guarantee per calibration rather than on average.
- ``mean_sigma``: max(mean + sigmas * std, highest held-out good score), the earlier default.
- ``recall``: a target recall R from held-out labelled defect scores d_(1) <= ... <= d_(m):
  the threshold is d_(j), j = floor((1 - R)(m + 1)), so a new defect exchangeable with them
  scores at or below it (is missed) with probability at most j / (m + 1) <= 1 - R.

Whatever the rule, a threshold at or above k of the n held-out good scores bounds the false-alarm
rate by (n + 1 - k) / (n + 1); held-out defects that did not set the threshold give a miss-rate
estimate with an exact (Clopper-Pearson) confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


def _beta() -> Any:
    """scipy's beta distribution, imported on first use (scipy.stats takes about a second to import)."""
    from scipy.stats import beta

    return beta


CONFORMAL = "conformal"
MEAN_SIGMA = "mean_sigma"
RECALL = "recall"
RULES = (CONFORMAL, MEAN_SIGMA, RECALL)
ThresholdRule = Literal["conformal", "mean_sigma", "recall"]
#: The defaults, chosen by measurement (BENCHMARKS.md, "Thresholds").
DEFAULT_RULE: ThresholdRule = "conformal"
DEFAULT_FALSE_ALARM_RATE = 0.05
DEFAULT_TARGET_RECALL = 0.95
#: Confidence of the intervals reported with measured rates.
CONFIDENCE = 0.95
#: Most scores a calibration keeps in ``config.json`` (each score list).
MAX_SCORES = 100_000
_EPS = 1e-9  # products like (n + 1) * (1 - A) in floating point, before ceil / floor


def conformal_rank(n: int, false_alarm_rate: float) -> int:
    """k = ceil((n + 1)(1 - A)); above n when n held-out scores cannot support the rate A."""
    return math.ceil((n + 1) * (1.0 - false_alarm_rate) - _EPS)


def confident_rank(n: int, false_alarm_rate: float, confidence: float) -> int:
    """Smallest k with P(Beta(n + 1 - k, k) > A) <= 1 - C; above n when n scores cannot give that."""
    for k in range(min(conformal_rank(n, false_alarm_rate), n + 1), n + 1):
        if float(_beta().sf(false_alarm_rate, n + 1 - k, k)) <= 1.0 - confidence + _EPS:
            return k
    return n + 1


def held_out_needed_confident(false_alarm_rate: float, confidence: float) -> int:
    """Fewest held-out good images whose highest score keeps the rate under A with confidence C."""
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(1.0 - false_alarm_rate) - _EPS))


def held_out_needed(false_alarm_rate: float) -> int:
    """Fewest held-out good images whose conformal threshold bounds the false-alarm rate by A."""
    return max(1, math.ceil(1.0 / false_alarm_rate - 1.0 - _EPS))


def recall_rank(m: int, target_recall: float) -> int:
    """j = floor((1 - R)(m + 1)); 0 when m defects cannot support the recall R."""
    return math.floor((1.0 - target_recall) * (m + 1) + _EPS)


def defects_needed(target_recall: float) -> int:
    """Fewest held-out defects whose recall-rule threshold bounds the miss rate by 1 - R."""
    return max(1, math.ceil(1.0 / (1.0 - target_recall) - 1.0 - _EPS))


def mean_sigma_threshold(mean: float, std: float, top: float, sigmas: float) -> float:
    """max(mean + sigmas * std, highest held-out score)."""
    return max(mean + sigmas * std, top)


def rate_interval(count: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a rate observed as ``count`` of ``n``."""
    if n <= 0:
        return (0.0, 1.0)
    tail = (1.0 - confidence) / 2
    low = 0.0 if count == 0 else float(_beta().ppf(tail, count, n - count + 1))
    high = 1.0 if count == n else float(_beta().ppf(1 - tail, count + 1, n - count))
    return (low, high)


@dataclass(frozen=True)
class RateEstimate:
    """A rate measured on ``n`` images: ``count`` of them, with its confidence interval."""

    count: int
    n: int

    @property
    def rate(self) -> float:
        return self.count / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return rate_interval(self.count, self.n)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"count": self.count, "n": self.n, "rate": self.rate, "interval": [low, high]}


@dataclass(frozen=True)
class Calibration:
    """A decision threshold, the rule that set it and the held-out scores it came from.

    ``good_scores`` / ``defect_scores`` are the held-out scores in ascending order (``good_scores``
    is None for models saved before the scores were kept; those hold only ``mean``, ``std`` and
    ``max``). The rule's own setting is ``false_alarm_rate`` (conformal), ``sigmas``
    (mean_sigma) or ``target_recall`` (recall). A stored calibration is checked on load by
    recomputing its threshold (:meth:`from_dict`).
    """

    rule: str
    threshold: float
    n_images: int
    good_scores: tuple[float, ...] | None = None
    defect_scores: tuple[float, ...] = ()
    false_alarm_rate: float | None = None
    confidence: float | None = None
    sigmas: float | None = None
    target_recall: float | None = None
    mean: float | None = None
    std: float | None = None
    max: float | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    # -- what the threshold promises ----------------------------------------------------------
    @property
    def n_below(self) -> int:
        """How many held-out good scores are at or below the threshold (all, for mean_sigma)."""
        if self.good_scores is None:
            return self.n_images  # only mean_sigma models lack scores, and its threshold is >= max
        return int(np.searchsorted(np.asarray(self.good_scores), self.threshold, side="right"))

    @property
    def false_alarm_bound(self) -> float:
        """Upper bound on the expected false-alarm rate for good images like the held-out ones."""
        return (self.n_images + 1 - self.n_below) / (self.n_images + 1)

    @property
    def false_alarm_range(self) -> tuple[float, float]:
        """Where the false-alarm rate of this one calibration lies with 95 % probability.

        The bound is an average over calibration sets; for exchangeable continuous scores the rate
        of a given set with k of n held-out scores at or below the threshold is Beta(n + 1 - k, k)
        distributed, so few held-out images leave a wide range around the bound.
        """
        k, n = self.n_below, self.n_images
        if k == 0:
            return (1.0, 1.0)
        tail = (1.0 - CONFIDENCE) / 2
        return (float(_beta().ppf(tail, n + 1 - k, k)), float(_beta().ppf(1 - tail, n + 1 - k, k)))

    @property
    def held_out_false_alarms(self) -> RateEstimate | None:
        """Held-out good images above the threshold, for a rule that did not set it from them."""
        if self.rule != RECALL or self.good_scores is None:
            return None
        return RateEstimate(self.n_images - self.n_below, self.n_images)

    @property
    def miss_bound(self) -> float | None:
        """The recall rule's bound on the miss rate of new defects like the held-out ones."""
        if self.rule != RECALL:
            return None
        return recall_rank(len(self.defect_scores), float(self.target_recall or 0)) / (len(self.defect_scores) + 1)

    @property
    def miss_estimate(self) -> RateEstimate | None:
        """Held-out defects at or below the threshold (missed), when they did not set it."""
        if not self.defect_scores or self.rule == RECALL:
            return None
        missed = int(np.searchsorted(np.asarray(self.defect_scores), self.threshold, side="right"))
        return RateEstimate(missed, len(self.defect_scores))

    def normalise(self, scores: Any) -> Any:
        """Scores divided by the threshold: above 1 means anomalous."""
        return scores / self.threshold

    def summary(self) -> dict[str, Any]:
        """What the threshold is and promises, as written to test results and shown to users."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "threshold": self.threshold,
            "n_held_out_good": self.n_images,
            "false_alarm_bound": self.false_alarm_bound,
            "false_alarm_range": list(self.false_alarm_range),
        }
        for key in ("false_alarm_rate", "confidence", "sigmas", "target_recall"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.defect_scores:
            out["n_held_out_defects"] = len(self.defect_scores)
        if self.miss_bound is not None:
            out["miss_bound"] = self.miss_bound
        for key, value in (("held_out_false_alarms", self.held_out_false_alarms), ("miss", self.miss_estimate)):
            if value is not None:
                out[key] = value.to_dict()
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def describe(self) -> str:
        """One line for people: threshold, rule and what it promises."""
        return describe_calibration(self.summary())

    # -- storage --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The stored form: the rule, the threshold, its setting, the scores (and older statistics)."""
        out: dict[str, Any] = {"rule": self.rule, "threshold": self.threshold, "n_images": self.n_images}
        for key in ("false_alarm_rate", "confidence", "sigmas", "target_recall", "mean", "std", "max"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.good_scores is not None:
            out["good_scores"] = list(self.good_scores)
        if self.defect_scores:
            out["defect_scores"] = list(self.defect_scores)
        return out

    @classmethod
    def from_dict(cls, data: object, *, nonnegative_scores: bool = False) -> Calibration:
        """A calibration read back from JSON, refused unless its threshold follows from what it stores.

        A dict without ``rule`` is a mean_sigma calibration of an earlier model. ``nonnegative_scores``
        says the method's scores are never negative, which rules out negative scores and a
        threshold of 0. Raises ValueError (TypeError for a non-object) with a one-line message
        naming the field.
        """
        from .calibration_check import parse_calibration

        return parse_calibration(cls, data, nonnegative_scores)


def sorted_scores(scores: Sequence[float] | np.ndarray, what: str) -> tuple[float, ...]:
    """Finite scores in ascending order; ValueError naming ``what`` otherwise."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: {int((~np.isfinite(values)).sum())} score(s) are not finite numbers")
    if values.size > MAX_SCORES:
        raise ValueError(f"{what}: {values.size} scores, more than the {MAX_SCORES} a calibration keeps")
    return tuple(float(v) for v in np.sort(values))


def calibrate(
    good_scores: Sequence[float] | np.ndarray,
    *,
    rule: str = CONFORMAL,
    false_alarm_rate: float = 0.05,
    confidence: float | None = None,
    sigmas: float = 3.0,
    target_recall: float = 0.95,
    defect_scores: Sequence[float] | np.ndarray = (),
) -> Calibration:
    """The threshold of ``rule`` from scores of good (and optionally defect) images the model did not fit on.

    ``defect_scores`` set the threshold under the recall rule and, under the others, estimate
    the miss rate; ``confidence`` makes the conformal bound hold per calibration set. Raises
    ValueError with one line when the scores cannot support the rule
    (no good scores; too few defects for the target recall).
    """
    good = sorted_scores(good_scores, "held-out good images")
    defects = sorted_scores(defect_scores, "held-out defect images")
    n = len(good)
    if n == 0:
        raise ValueError("calibration needs at least one held-out good image")
    check_rule_setting(rule, false_alarm_rate, sigmas, target_recall, confidence)
    if rule == CONFORMAL:
        k = (
            conformal_rank(n, false_alarm_rate)
            if confidence is None
            else confident_rank(n, false_alarm_rate, confidence)
        )
        notes: tuple[str, ...] = ()
        if k > n:
            if confidence is None:
                unmet = f"cannot support a false-alarm rate of {false_alarm_rate:g}"
                needed = held_out_needed(false_alarm_rate)
            else:
                unmet = f"cannot keep the false-alarm rate under {false_alarm_rate:g} with {confidence:.0%} confidence"
                needed = held_out_needed_confident(false_alarm_rate, confidence)
            notes = (
                f"{n} held-out good image(s) {unmet} (that needs at least {needed}); the threshold is the highest "
                f"held-out score, which bounds the rate by {1 / (n + 1):.3g} only",
            )
            k = n
        return Calibration(
            CONFORMAL,
            good[k - 1],
            n,
            good,
            defects,
            false_alarm_rate=false_alarm_rate,
            confidence=confidence,
            notes=notes,
        )
    if rule == MEAN_SIGMA:
        values = np.asarray(good)
        mean, top = float(values.mean()), float(values.max())
        std = float(values.std(ddof=1)) if n > 1 else 0.0
        threshold = mean_sigma_threshold(mean, std, top, sigmas)
        return Calibration(MEAN_SIGMA, threshold, n, good, defects, sigmas=sigmas, mean=mean, std=std, max=top)
    m = len(defects)
    j = recall_rank(m, target_recall)
    if j == 0:
        raise ValueError(
            f"{m} held-out defect image(s) cannot support a target recall of {target_recall:g} "
            f"(that needs at least {defects_needed(target_recall)})"
        )
    return Calibration(RECALL, defects[j - 1], n, good, defects, target_recall=target_recall)


def check_rule_setting(
    rule: str, false_alarm_rate: float, sigmas: float, target_recall: float, confidence: float | None = None
) -> None:
    """ValueError unless ``rule`` is known and its setting is in range."""
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r} (known: {', '.join(RULES)})")
    named = {"false_alarm_rate": false_alarm_rate, "threshold_sigmas": sigmas, "target_recall": target_recall}
    for name, value in named.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be between 0 and 1, got {false_alarm_rate}")
    if not 0.0 <= sigmas <= 10.0:  # a huge one would call every image good
        raise ValueError(f"threshold_sigmas must be in [0, 10], got {sigmas}")
    if not 0.0 < target_recall < 1.0:
        raise ValueError(f"target_recall must be between 0 and 1, got {target_recall}")
    if confidence is not None and not (math.isfinite(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"false_alarm_confidence must be between 0 and 1 (or none), got {confidence}")


def describe_rate(entry: dict[str, Any]) -> str:
    """A rate of :meth:`RateEstimate.to_dict` for people: ``4.8% (3/63; 95% interval 1.0%-13.3%)``."""
    low, high = entry["interval"]
    return f"{entry['rate']:.1%} ({entry['count']}/{entry['n']}; {CONFIDENCE:.0%} interval {low:.1%}-{high:.1%})"


def describe_calibration(summary: dict[str, Any]) -> str:
    """One line for people from :meth:`Calibration.summary`: the threshold, its rule and its promises."""
    rule = summary["rule"]
    setting = {
        CONFORMAL: f"target false-alarm rate {summary.get('false_alarm_rate', 0):g}"
        + (f" with {summary['confidence']:.0%} confidence" if summary.get("confidence") is not None else ""),
        MEAN_SIGMA: f"mean + {summary.get('sigmas', 0):g} sd, at least the highest",
        RECALL: f"target recall {summary.get('target_recall', 0):g} from {summary.get('n_held_out_defects', 0)} "
        "held-out defects",
    }[rule]
    text = (
        f"threshold {summary['threshold']:.4g} ({rule}: {setting}; {summary['n_held_out_good']} held-out good "
        f"images): false alarms expected <= {summary['false_alarm_bound']:.1%}"
    )
    if "false_alarm_range" in summary:
        low, high = summary["false_alarm_range"]
        text += f" (95% range for this calibration {low:.1%}-{high:.1%})"
    if "miss_bound" in summary:
        text += f", misses expected <= {summary['miss_bound']:.1%}"
    for key, what in (("miss", "held-out defects missed"), ("held_out_false_alarms", "held-out good flagged")):
        if key in summary:
            text += f"; {what}: {describe_rate(summary[key])}"
    return text


#: The setting of each rule, as its parameter name.
RULE_SETTINGS = {CONFORMAL: "false_alarm_rate", MEAN_SIGMA: "threshold_sigmas", RECALL: "target_recall"}
#: Settings beside the main one that also choose a rule.
_MORE_SETTINGS = {"false_alarm_confidence": CONFORMAL}


def chosen_rule(rule: str | None, settings: dict[str, Any]) -> str | None:
    """The rule that ``rule`` and the given rule ``settings`` (parameter name -> value) choose.

    A setting chooses its rule; None when neither says. ValueError when they disagree.
    """
    named = [r for r, key in RULE_SETTINGS.items() if settings.get(key) is not None]
    named += [r for key, r in _MORE_SETTINGS.items() if settings.get(key) is not None and r not in named]
    if len(named) > 1 or (rule is not None and named and named[0] != rule):
        given = ", ".join(RULE_SETTINGS[r] for r in named)
        raise ValueError(
            f"{given}{f' with threshold rule {rule}' if rule else ''}: each rule has its own setting "
            "(conformal: false_alarm_rate, mean_sigma: threshold_sigmas, recall: target_recall); give one"
        )
    return rule or (named[0] if named else None)
