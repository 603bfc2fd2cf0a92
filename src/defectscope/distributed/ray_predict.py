"""``predict --engine ray``: score images on a Ray cluster, one model per worker, results streamed to a file.

The driver lists the images (as ``predict`` does), leaves out those already in the results file,
and hands the paths to Ray Data. ``workers`` actors each load the run folder once (it must be
reachable at the same path on every node: a shared file system) and score batches of paths with
the same code as the local ``predict``; their records stream back to the driver, which appends
each batch to the results file as it arrives (:mod:`.results_file`). Memory stays bounded: Ray
Data streams the paths and keeps only a few batches in flight. Records arrive in the order the
workers finish them, not the order of the paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Sample
from ..engines import EngineChoice
from ..errors import DefectscopeError
from ..methods import load
from ..progress import Log, progress_enabled, quiet
from ..records import Record
from ..runs.info import run_info
from ..runs.prediction import prediction_record, prediction_samples
from .ray_data import RunWorker, on_workers
from .results_file import ResultsFile
from .runtime import require_ray


@dataclass
class RayPredictResult:
    """What a distributed predict did: records scored now, images skipped as already in the file."""

    out: Path
    scored: list[Record]
    skipped: int

    @property
    def n_errors(self) -> int:
        return sum(r.verdict == "error" for r in self.scored)


class _Scorer(RunWorker):
    """A Ray actor: the run's detector, loaded once, scoring batches of image paths into records."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        samples = [Sample(Path(str(p)), 0, "unknown", None, str(c)) for p, c in zip(batch["path"], batch["category"])]
        rows = [
            prediction_record(self.detector, item).to_dict(False)
            for item in self.detector.inspect(samples, batch_size=self.batch_size)
        ]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {"path": []}


def predict_ray(
    run: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    batch_size: int | None = None,
    device: str = "cpu",
    engine: EngineChoice | None = None,
    overwrite: bool = False,
    log: Log = quiet,
) -> RayPredictResult:
    """Score every image ``paths`` stand for with the run folder ``run`` on Ray, appending records to ``out``.

    ``address`` is that of a running cluster (``auto``, ``ray://HOST:PORT``); without it a local Ray
    runtime is started with ``workers * threads_per_worker`` CPUs. An existing ``out`` is resumed
    (its images are not scored again) unless ``overwrite``, which starts it afresh.
    """
    if workers < 1 or threads_per_worker < 1:
        raise DefectscopeError(f"--workers and threads per worker must be at least 1, got {workers}")
    require_ray()  # before any work: one line when Ray is missing
    target = Path(out)
    run = str(Path(run).resolve())
    info = run_info(load(run))  # fails here, in one line, for a folder that is not a run
    samples = prediction_samples(paths, info.categories if info else [])
    if overwrite and target.is_file():  # only once the run and the images are known to be there
        target.unlink()
    results = ResultsFile(target)
    todo = [s for s in samples if str(s.path) not in results.done]
    skipped = len(samples) - len(todo)
    if skipped:
        log(f"{target}: {skipped} of {len(samples)} images already scored there; scoring the other {len(todo)}")
    scored: list[Record] = []
    if not todo:
        return RayPredictResult(target, scored, skipped)
    items = [{"path": str(s.path), "category": s.category or ""} for s in todo]
    dataset = on_workers(
        items,
        _Scorer,
        run=run,
        address=address,
        workers=workers,
        threads=threads_per_worker,
        batch_size=batch_size,
        device=device,
        engine=engine,
    )
    from tqdm import tqdm

    with tqdm(total=len(todo), desc="predicting on ray", unit="img", disable=not progress_enabled()) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            records = [_record(batch, i) for i in range(len(batch["path"]))]
            results.append(records)
            scored += records
            bar.update(len(records))
    return RayPredictResult(target, scored, skipped)


def _record(batch: dict[str, Any], i: int) -> Record:
    """Row ``i`` of a batch of record columns, with numpy scalars turned back into Python values."""
    values = {key: column[i] for key, column in batch.items()}
    return Record(**{key: v.item() if hasattr(v, "item") else v for key, v in values.items()})
