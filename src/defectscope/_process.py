"""Process-wide settings made before torch is first imported (``import defectscope`` runs this first)."""

import ctypes
import os
import sys

# Idle OpenMP threads sleep instead of spinning. Read once when torch loads, so it is set before
# the first torch import; spinning threads of small training steps cost many times the CPU time of
# the work itself whenever the CPU is shared with other jobs. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_large_blocks() -> None:
    """glibc gives every freed block over 32 MiB back to the kernel, so each batch's activations (up to
    ~100 MiB at batch 16) are page-faulted and zeroed again: measured, a third of PatchCore's predict
    time went to the kernel. Freed blocks up to 256 MiB are kept for reuse instead (a few hundred MiB
    of RSS at most). MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment win."""
    if sys.platform != "linux" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: larger blocks still get their own mapping
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD: keep up to this much free memory at the top
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


_keep_large_blocks()
