"""The run layer: the one place a run is built, under every front end (CLI, service, bench).

>>> from defectscope.runs import fit_run, evaluate_run, predict_run
>>> fitted = fit_run("path/to/bottle", "runs/bottle")             # fit + save, returns FitResult
>>> result = evaluate_run("runs/bottle")                          # metrics, report, per-image records
>>> records = predict_run("runs/bottle", ["new/images"]).records  # score, verdict per image
>>> calibrate_run("runs/bottle", ["confirmed/good"], false_alarm_rate=0.01)  # a new threshold

Nothing here prints or parses arguments: progress sentences go to an optional ``log`` callback,
and every result is a typed record.
"""

from ..records import EXIT_IMAGES_ERRORED, Record, format_records, judge
from .calibration import CalibrateResult, calibrate_run
from .evaluation import CategoryResult, EvalResult, evaluate_run
from .fitting import FitResult, build_detector, fit_run
from .info import RunInfo, run_info
from .prediction import PredictResult, predict_run, prediction_record, prediction_samples
from .synthesis import SynthResult, synth_run

__all__ = [
    "EXIT_IMAGES_ERRORED",
    "CalibrateResult",
    "CategoryResult",
    "EvalResult",
    "FitResult",
    "PredictResult",
    "Record",
    "RunInfo",
    "SynthResult",
    "build_detector",
    "calibrate_run",
    "evaluate_run",
    "fit_run",
    "format_records",
    "judge",
    "predict_run",
    "prediction_record",
    "prediction_samples",
    "run_info",
    "synth_run",
]
