"""Shared fixtures: the real datasets in ../shared/datasets (skipped with a reason when absent)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Set before anything imports torch (test modules may import torch before defectscope does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: The service tests' fixtures (a small fitted run, apps with a real log, a live server) and the
#: inspection-log databases (``postgres``: the session's throwaway PostgreSQL; ``backend``: SQLite and it).
pytest_plugins = ["serve_helpers", "pg_cluster"]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "bottle_small"


def _datasets_root() -> Path:
    env = os.environ.get("DEFECTSCOPE_DATASETS")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    root = _datasets_root()
    if not root.is_dir():
        pytest.skip(f"shared datasets not found at {root} (set DEFECTSCOPE_DATASETS to run this test)")
    return root


@pytest.fixture(scope="session")
def bottle_root(datasets_root: Path) -> Path:
    return datasets_root / "mvtec_bottle" / "bottle"


@pytest.fixture(scope="session")
def mtd_root(datasets_root: Path) -> Path:
    return datasets_root / "mtd" / "magnetic_tile"


@pytest.fixture(scope="session")
def example_root() -> Path:
    return EXAMPLE


@pytest.fixture(scope="session")
def unprivileged_ok() -> bool:
    """Whether an unprivileged user (nobody) can import defectscope, read the bundled example and the
    backbone weights; permission-fault tests drop to that user and skip where it cannot (a clone
    inside a folder private to root)."""
    script = (
        "import os, defectscope.cli; from defectscope.backbones import resolve_weights; "
        "paths = [resolve_weights(name, None) for name in ('mobilenet_v2', 'efficientnet_lite0')]; "
        "os.setgid(65534); os.setuid(65534); [open(p, 'rb').close() for p in paths]; "
        f"os.listdir({str(EXAMPLE)!r})"
    )
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    return subprocess.run([sys.executable, "-c", script], capture_output=True, check=False).returncode == 0
