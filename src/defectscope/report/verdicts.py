"""The report's "Verdicts at the threshold" section: the threshold's rule in words, the measured
false-alarm and miss rates against their stated bounds, the confusion counts, and the text labelling
the threshold in the score histogram.
"""

from __future__ import annotations

from typing import Any

from ..thresholds import CONFIDENCE, CONFORMAL, MEAN_SIGMA, RECALL, describe_calibration
from .text import esc, pct

#: Rows of the rate table: key in the verdict summary, what it counts, the rate's name, key of its bound.
_RATES = (
    ("false_alarms", "false alarms (good images judged anomalous)", "false-alarm rate", "false_alarm_bound"),
    ("misses", "misses (defective images judged good)", "miss rate", "miss_bound"),
)


def _rule_in_words(calibration: dict[str, Any]) -> str:
    """What the threshold's rule did and promises, in a sentence for an operator."""
    rule = calibration.get("rule")
    n_good = calibration.get("n_held_out_good", 0)
    flagged = (
        f"new good images like the {n_good} held-out ones should be flagged at most "
        f"{pct(calibration.get('false_alarm_bound'))} of the time on average"
    )
    if "false_alarm_range" in calibration:
        low, high = calibration["false_alarm_range"]
        flagged += (
            f" (with this many held-out images, the rate of this one calibration lies between {pct(low)} and "
            f"{pct(high)} with 95 % probability)"
        )
    if rule == CONFORMAL:
        return (
            f"Conformal rule: the threshold was set from the scores of {n_good} held-out good images (not "
            f"used for fitting) for a target false-alarm rate of {pct(calibration.get('false_alarm_rate'))}"
            + (
                f", to hold for this calibration with {pct(calibration['confidence'])} confidence"
                if calibration.get("confidence") is not None
                else ""
            )
            + "; "
            f"{flagged}."
        )
    if rule == MEAN_SIGMA:
        return (
            f"Mean + {calibration.get('sigmas', 0):g} sd rule: the threshold is the mean score of {n_good} "
            f"held-out good images (not used for fitting) plus {calibration.get('sigmas', 0):g} standard "
            f"deviations, and at least their highest score; {flagged}."
        )
    if rule == RECALL:
        return (
            f"Recall rule: the threshold was set from the scores of {calibration.get('n_held_out_defects', 0)} "
            f"held-out defective images (not used for fitting) for a target recall of "
            f"{pct(calibration.get('target_recall'))}; new defects like them should be missed at most "
            f"{pct(calibration.get('miss_bound'))} of the time, and {flagged}."
        )
    return f"Threshold rule {rule}: {flagged}."


def _rule_short(calibration: dict[str, Any]) -> str:
    """The rule and its setting in a few characters: "conformal 5 %", "mean + 3 sd", "recall 95 %"."""
    rule = str(calibration.get("rule"))
    if rule == CONFORMAL:
        return f"conformal {pct(calibration.get('false_alarm_rate'))}"
    if rule == MEAN_SIGMA:
        return f"mean + {calibration.get('sigmas', 0):g} sd"
    if rule == RECALL:
        return f"recall {pct(calibration.get('target_recall'))}"
    return rule


def _rate_cells(entry: dict[str, Any]) -> str:
    """count / n, rate and interval cells of one measured rate."""
    if not entry.get("n"):
        return '<td class="value">0 / 0</td><td class="value">n/a</td><td>none in the test set</td>'
    low, high = entry["interval"]
    return (
        f'<td class="value">{entry["count"]} / {entry["n"]}</td><td class="value">{pct(entry["rate"])}</td>'
        f"<td>{pct(low)} &ndash; {pct(high)}</td>"
    )


def _above_bound(entry: dict[str, Any], bound: float | None) -> bool:
    """Whether a measured rate is above its stated bound beyond chance (its interval's low end is)."""
    return bound is not None and bool(entry.get("n")) and entry["interval"][0] > bound


def _rates_table(verdicts: dict[str, Any], calibration: dict[str, Any]) -> tuple[str, list[str]]:
    """The table of false-alarm and miss rates (overall and per defect type) and warnings about them."""
    rows, warnings = [], []
    for key, what, rate_name, bound_key in _RATES:
        entry, bound = verdicts[key], calibration.get(bound_key)
        over = _above_bound(entry, bound)
        if over:
            low, high = entry["interval"]
            warnings.append(
                f"The measured {rate_name} is above the stated bound beyond chance: {pct(entry['rate'])} "
                f"({CONFIDENCE:.0%} interval {pct(low)} \u2013 {pct(high)}) against at most {pct(bound)}. "
                "The test images may differ from the held-out ones; do not rely on the stated bound."
            )
        css = ' class="over"' if over else ""
        rows.append(
            f'<tr data-rate="{key}"{css}><th class="row">{esc(what)}</th>'
            f"{_rate_cells(entry)}<td>{'at most ' + pct(bound) if bound is not None else 'none stated'}</td></tr>"
        )
        if key == "misses":
            rows += [
                f'<tr data-rate="misses" data-type="{esc(name)}"><td class="sub">{esc(name)}</td>'
                f"{_rate_cells(typed)}<td></td></tr>"
                for name, typed in verdicts.get("misses_by_type", {}).items()
            ]
    table = (
        '<table class="metrics" id="rates"><caption>Measured rates</caption><tr><th></th><th>count / n</th>'
        f"<th>rate</th><th>{CONFIDENCE:.0%} interval</th><th>stated bound</th></tr>" + "".join(rows) + "</table>"
    )
    return table, warnings


def _confusion_table(verdicts: dict[str, Any]) -> str:
    """The 2x2 confusion counts: rows the truth, columns the verdict."""
    c = verdicts["counts"]

    def cell(name: str, count: int, wrong: bool) -> str:
        return f'<td class="value{" wrong" if wrong and count else ""}" data-cell="{name}">{count}</td>'

    return (
        '<table class="metrics" id="confusion"><caption>Confusion counts</caption>'
        "<tr><th></th><th>judged good</th><th>judged anomalous</th></tr>"
        '<tr><th class="row">actually good</th>'
        f"{cell('true_negative', c['true_negative'], False)}{cell('false_positive', c['false_positive'], True)}</tr>"
        '<tr><th class="row">actually defective</th>'
        f"{cell('false_negative', c['false_negative'], True)}{cell('true_positive', c['true_positive'], False)}</tr>"
        f'<tr><td colspan="3" class="small">accuracy {pct(verdicts.get("accuracy"))}</td></tr></table>'
    )


def verdicts_section(summary: dict[str, Any]) -> list[str]:
    """The section saying what the threshold promises and what its verdicts did on this test set."""
    calibration, verdicts = summary.get("calibration"), summary.get("verdicts")
    parts = ['<h2 id="verdicts">Verdicts at the threshold</h2>']
    if not calibration and summary.get("threshold") is None:  # (verdicts then hold only errors, if any)
        parts.append(
            '<p class="facts" id="no-verdicts">This model has no calibrated threshold, so no image was judged '
            "good or anomalous and no false-alarm or miss rate can be shown.</p>"
        )
        return parts
    if calibration:
        parts.append(f'<p class="rule">{esc(_rule_in_words(calibration))}</p>')
        parts.append(f'<p class="facts small">{esc(describe_calibration(calibration))}</p>')
        parts += [f'<p class="note">note: {esc(note)}</p>' for note in calibration.get("notes", [])]
    else:
        parts.append('<p class="facts">The rule that set the threshold was not recorded.</p>')
    if not verdicts:
        parts.append('<p class="facts">No labelled image was judged, so no rate can be measured.</p>')
        return parts
    rates, warnings = _rates_table(verdicts, calibration or {})
    parts += [f'<p class="note">{esc(w)}</p>' for w in warnings]
    parts += ['<div class="tables">', rates, _confusion_table(verdicts), "</div>"]
    errors = verdicts["counts"].get("errors", 0)
    if errors:
        parts.append(
            f'<p class="note" id="verdict-errors">{errors} image(s) got the verdict error (score not a finite '
            "number); they are counted above as judged anomalous, since such an image is never passed as good.</p>"
        )
    return parts


def threshold_label(calibration: dict[str, Any] | None, verdicts: dict[str, Any] | None) -> list[str]:
    """Lines labelling the histogram's threshold: the rule, then the measured rates."""
    lines = [f"threshold ({_rule_short(calibration)})" if calibration else "threshold"]
    if verdicts:
        false_alarms, misses = verdicts["false_alarms"], verdicts["misses"]
        lines.append(
            f"{pct(false_alarms['rate'] if false_alarms['n'] else None)} false alarms, "
            f"{pct(misses['rate'] if misses['n'] else None)} missed"
        )
    return lines
