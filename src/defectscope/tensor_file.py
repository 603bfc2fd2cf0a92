"""Reading a safetensors file with chosen tensors memory-mapped instead of read into memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range) and the raw little-endian data. A memory-mapped tensor is a copy-on-write
view of its byte range: pages are read from disk when touched and the kernel may drop them again,
so a memory bank many times the size of the machine's memory can be searched by reading only the
rows a query needs. The header is checked as untrusted data before anything is mapped.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterable

import numpy as np
import torch
from safetensors.torch import load_file

#: safetensors dtype names that can be mapped, as numpy dtypes (little-endian).
DTYPES = {
    "F32": "<f4",
    "F64": "<f8",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
MAX_HEADER = 100 * 2**20


def read_tensors(path: str, mapped: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``; those named in ``mapped`` memory-mapped.

    Raises ValueError for a header that does not describe the file (sizes, offsets, dtypes).
    """
    mapped = set(mapped)
    if not mapped:
        return load_file(path)
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= MAX_HEADER:
            raise ValueError(f"header length {size} is out of range")
        header = json.loads(handle.read(size))
        handle.seek(0, 2)
        file_size = handle.tell()
    start = 8 + size
    out: dict[str, torch.Tensor] = {}
    resident = [name for name in header if name != "__metadata__" and name not in mapped]
    if resident:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as opened:
            for name in resident:
                out[name] = opened.get_tensor(name)
    for name in mapped & set(header):
        entry = header[name]
        dtype = DTYPES.get(entry.get("dtype"))
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise ValueError(f"tensor {name}: header entry {entry!r} cannot be mapped")
        begin, end = offsets
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= file_size - start):
            raise ValueError(f"tensor {name}: byte range {offsets} lies outside the file")
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name}: byte range {offsets} does not hold shape {shape}")
        if end == begin:
            out[name] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            continue
        view = np.memmap(path, dtype=dtype, mode="c", offset=start + begin, shape=tuple(shape))
        if hasattr(mmap, "MADV_RANDOM"):  # rows are read where queries land: no read-ahead around them
            view._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
        out[name] = torch.from_numpy(view)
    return out


def all_finite(tensor: torch.Tensor, rows: int = 65536) -> bool:
    """True when a floating-point tensor holds only finite numbers, checked ``rows`` leading rows at a time
    (a memory-mapped tensor is read once, without a tensor-sized temporary)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.ndim == 0:
        return bool(torch.isfinite(tensor))
    return all(bool(torch.isfinite(tensor[a : a + rows]).all()) for a in range(0, tensor.shape[0], rows))
