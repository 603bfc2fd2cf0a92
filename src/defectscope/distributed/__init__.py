"""Work past one process: prediction and fitting on a Ray cluster (``--engine ray``)."""

from .ray_fit import RayShards
from .ray_predict import RayPredictResult, predict_ray
from .results_file import ResultsFile, read_results
from .runtime import require_ray, start_ray

__all__ = ["RayPredictResult", "RayShards", "ResultsFile", "predict_ray", "read_results", "require_ray", "start_ray"]
