"""Input checks and the shared ranking behind every threshold-sweeping metric.

ROC, PR, F1 and PRO curves are all functions of how many positives and negatives score at or
above each threshold. :class:`Ranking` holds exactly that, for every distinct score value (ties
collapse to one threshold, as in scikit-learn) or, for speed, only at the distinct scores that
can change a metric value; each metric is then a few vectorised lines on top of a single sort.

Each class is sorted once (``np.sort`` of the large normal class is several times faster than
one ``argsort`` of all scores); counts come from merging the two sorted runs (all thresholds)
or from binary searches (few thresholds). The result is the same as one global sort with
cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranking:
    """Cumulative counts at distinct scores (all, or the corners only), highest score first.

    ``tp[k]`` / ``fp[k]`` count the positives / negatives with ``score >= thresholds[k]``;
    ``gain[k]`` (when weights were given) is the fraction of the positives' total weight that
    those positives carry.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gain: np.ndarray | None = None

    @property
    def n_pos(self) -> int:
        return int(self.tp[-1])

    @property
    def n_neg(self) -> int:
        return int(self.fp[-1])


def as_scores(scores: object, name: str) -> np.ndarray:
    """Return ``scores`` as a float32/float64 array (float32 kept as is: it is what maps use)."""
    try:
        arr = np.asarray(scores)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"{name} cannot be made into an array: {exc}") from None
    if arr.dtype in (np.float32, np.float64):
        return arr
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype.kind in "biuf":  # bool, integers, other floats: exact in float64
        return arr.astype(np.float64)
    raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")


def as_binary(labels: object, name: str) -> np.ndarray:
    """Return ``labels`` as a bool array; only bool or values exactly 0/1 are accepted."""
    try:
        arr = np.asarray(labels)
    except ValueError as exc:
        raise ValueError(f"{name} cannot be made into an array: {exc}") from None
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be bool or 0/1, got dtype {arr.dtype}")
    positive = arr == 1
    if not np.all(positive | (arr == 0)):
        bad = arr[~(positive | (arr == 0))][0]
        raise ValueError(f"{name} must be bool or 0/1, found the value {bad!r} (for 0/255 masks pass `mask > 0`)")
    return positive


def check_labels_scores(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D image-level inputs: same length, non-empty, binary labels, real scores."""
    y = as_binary(labels, "labels")
    s = as_scores(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    return y, s


def require_both_classes(n_pos: int, n_neg: int, what: str, unit: str) -> None:
    """Raise when a ranking metric is undefined because one class is missing."""
    if n_pos == 0 or n_neg == 0:
        missing = "anomalous" if n_pos == 0 else "normal"
        raise ValueError(f"{what} contain no {missing} {unit}; the metric is undefined")


def _require_finite(sorted_scores: np.ndarray, name: str) -> None:
    # After an ascending sort NaN sits at the end and -inf at the start: two reads check all.
    if sorted_scores.size and not (np.isfinite(sorted_scores[0]) and np.isfinite(sorted_scores[-1])):
        raise ValueError(f"{name} contain NaN or infinite values")


def _distinct(sorted_scores: np.ndarray) -> np.ndarray:
    keep = np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1]))
    return sorted_scores[keep]


def _corner_thresholds(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> np.ndarray:
    """The distinct scores where the TP count starts or stops changing, plus the lowest score.

    Between two such scores only negatives are added: those curve points lie on a horizontal
    segment of the ROC and PRO curves (collinear, no area of their own), add no recall to AP
    and cannot beat the F1 of the segment's start. Dropping them changes no metric value and
    leaves about two points per distinct positive score instead of one per pixel.
    """
    starts = _distinct(pos_sorted)
    # The next distinct score above each positive value, from either class.
    after = np.searchsorted(neg_sorted, starts, side="right")
    inside = after < neg_sorted.size
    next_neg = np.full(starts.shape, np.inf, dtype=starts.dtype)
    next_neg[inside] = neg_sorted[after[inside]]
    next_pos = np.append(starts[1:], np.inf).astype(starts.dtype)
    ends = np.minimum(next_neg, next_pos)
    lowest = min(neg_sorted[0], pos_sorted[0])
    return np.unique(np.concatenate((starts, ends[np.isfinite(ends)], [lowest])))


def _all_thresholds(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score, ascending, with the counts of positives / negatives below it.

    A stable sort of the two concatenated sorted runs is a linear merge; positive ``j`` lands
    after the ``j`` positives before it and every negative scoring ``<=`` it, which marks the
    positives without an ``argsort``. Cumulative counts read at the first index of each run of
    equal scores are the counts strictly below that score.
    """
    merged = np.sort(np.concatenate((neg_sorted, pos_sorted)), kind="stable")
    from_pos = np.zeros(merged.size, dtype=bool)
    negatives_before = np.searchsorted(neg_sorted, pos_sorted, side="right")
    from_pos[negatives_before + np.arange(pos_sorted.size)] = True
    first = np.flatnonzero(np.concatenate(([True], merged[1:] != merged[:-1])))
    pos_below = np.cumsum(from_pos)[first] - from_pos[first]
    return merged[first], pos_below, first - pos_below


def rank_split(
    pos_scores: np.ndarray,
    neg_scores: np.ndarray,
    pos_weights: np.ndarray | None = None,
    *,
    compact: bool = False,
    overwrite: bool = False,
    name: str = "scores",
) -> Ranking:
    """Rank positive and negative scores given separately (both classes non-empty).

    With ``compact=False`` there is one threshold per distinct score (the full curves, as
    scikit-learn returns them); with ``compact=True`` only the thresholds that can change a
    metric value (see :func:`_corner_thresholds`), which is much faster for pixel-level data.
    ``overwrite=True`` sorts the score arrays in place instead of copying them (for temporaries).
    """
    neg_sorted = neg_scores if overwrite else neg_scores.copy()
    neg_sorted.sort()
    if pos_weights is None:
        pos_sorted = pos_scores if overwrite else pos_scores.copy()
        pos_sorted.sort()
    else:
        pos_order = np.argsort(pos_scores, kind="stable")
        pos_sorted = pos_scores[pos_order]
    _require_finite(neg_sorted, name)
    _require_finite(pos_sorted, name)

    if compact:
        ascending = _corner_thresholds(pos_sorted, neg_sorted)
        pos_below = np.searchsorted(pos_sorted, ascending, side="left")
        neg_below = np.searchsorted(neg_sorted, ascending, side="left")
    else:
        ascending, pos_below, neg_below = _all_thresholds(pos_sorted, neg_sorted)
    tp = pos_sorted.size - pos_below[::-1]
    fp = neg_sorted.size - neg_below[::-1]

    gain = None
    if pos_weights is not None:
        # Positives counted at a threshold are exactly the top ``tp`` positives by score.
        # Normalised by the total so that "all positives" is exactly 1.
        cumulative = np.cumsum(pos_weights[pos_order][::-1], dtype=np.float64)
        gain = np.concatenate(([0.0], cumulative / cumulative[-1]))[tp]
    return Ranking(thresholds=ascending[::-1].copy(), tp=tp, fp=fp, gain=gain)


def rank(labels: object, scores: object) -> Ranking:
    """Validate image-level inputs and rank them; raises ValueError when one class is missing."""
    y, s = check_labels_scores(labels, scores)
    n_pos = int(np.count_nonzero(y))
    require_both_classes(n_pos, y.size - n_pos, "labels", "sample")
    return rank_split(s[y], s[~y])
