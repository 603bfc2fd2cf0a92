"""What the benches share: the description of the machine a result was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Python and torch versions, torch's thread count, the CPU model and core count, OMP_WAIT_POLICY."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file, so an interrupted run never leaves half a file."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    tmp.replace(path)


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing, not a number or not finite (JSON has no NaN)."""
    import math

    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def saved_ok(path: Path, force: bool) -> bool:
    """Whether a finished measurement is saved at ``path`` and may be skipped (not with ``--force``)."""
    import json

    return path.exists() and not force and json.loads(path.read_text()).get("status") == "ok"


def add_datasets_root(parser: Any) -> None:
    """``--datasets-root``: the shared datasets folder (default: $DEFECTSCOPE_DATASETS, else ../shared/datasets)."""
    repo = Path(__file__).resolve().parents[1]
    default = os.environ.get("DEFECTSCOPE_DATASETS", str(repo.parent / "shared" / "datasets"))
    parser.add_argument("--datasets-root", default=default, help="folder of the shared datasets (default: %(default)s)")


def f3(x: float | None) -> str:
    """Three decimals, or a dash for a missing figure."""
    return "-" if x is None else f"{x:.3f}"


def finish_summary(path: Path, summary: dict[str, Any], table: str) -> None:
    """Write a bench's summary JSON, print its table, the runs still missing and where it went."""
    write_json(path, summary)
    print(table)
    if summary.get("missing"):
        print("missing: " + ", ".join(summary["missing"]))
    print(f"written: {path}")
