"""Training checkpoints as JSON + safetensors: module weights, optimizer state and progress.

A checkpoint is a folder with ``checkpoint.json`` and ``checkpoint.safetensors``. Both are written
in full under temporary names, fsynced, and only then renamed (tensors first, JSON last, the JSON
holding the tensors' sha256), so a crash, a Ctrl-C or a full disk at any moment leaves the
previous checkpoint readable and no temporary file behind. Nothing is pickled: optimizer states
are flattened into named tensors plus JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFileError
from .outputs import StagedFiles, make_folder

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_TENSORS = "checkpoint.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def flatten_optimizer(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (named tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file`` (contiguous CPU copies), its I/O failures raised as OSError."""
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        code = re.search(r"os error (\d+)", str(exc))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        raise OSError(str(exc)) from None


def write_hashed_pair(
    folder: Path,
    tensors_name: str,
    tensors: dict[str, torch.Tensor],
    config_name: str,
    config: dict[str, Any],
    text: Callable[[dict[str, Any]], str],
) -> None:
    """Replace ``folder/tensors_name`` and ``folder/config_name`` together; the config records the tensors' sha256.

    The tensors are staged first and ``config["tensors_sha256"]`` set from the staged file, so a
    crash between the two renames is detected on load; on any error both earlier files stay.
    """
    with StagedFiles() as staged:
        tmp = staged.stage_with(folder / tensors_name, lambda path: write_safetensors(tensors, path))
        config["tensors_sha256"] = sha256_file(tmp)
        staged.stage(folder / config_name, text(config))
        staged.commit()


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically replace the checkpoint in ``folder`` with ``tensors`` and ``meta``.

    Raises :class:`~defectscope.errors.OutputError` when it cannot be written; the previous
    checkpoint is then unchanged.
    """
    make_folder(folder, "the checkpoint")
    write_hashed_pair(
        folder, CHECKPOINT_TENSORS, tensors, CHECKPOINT_JSON, dict(meta), lambda r: json.dumps(r, indent=2) + "\n"
    )


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, meta) of the checkpoint in ``folder``, None when there is none."""
    path = folder / CHECKPOINT_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc}); delete the checkpoint folder to start over") from None
    tensors_path = folder / CHECKPOINT_TENSORS
    if not tensors_path.is_file() or sha256_file(tensors_path) != meta.get("tensors_sha256"):
        raise ModelFileError(
            f"{tensors_path}: missing or does not match {CHECKPOINT_JSON}; delete the checkpoint folder to start over"
        )
    try:
        return load_file(str(tensors_path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{tensors_path}: cannot be read ({exc})") from None
