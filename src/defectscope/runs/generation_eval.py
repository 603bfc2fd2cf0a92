"""``generate evaluate``: generation metrics per defect type and a contact sheet of a generated folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..devices import check_device
from ..errors import DefectscopeError
from ..generate.contact_sheet import contact_sheet
from ..generate.generator import read_config
from ..generate.metrics import MANIFEST, evaluate_generated, generated_pairs, read_manifest
from ..outputs import atomic_write_json
from ..progress import Log, quiet
from .generation import generate_sample_run

#: Generated pairs per type shown on the contact sheet.
SHEET_PAIRS = 16


@dataclass
class GenerateEvaluation:
    """The metrics of a generated folder, where they were written, and a table for the terminal."""

    metrics: dict[str, Any]
    json_path: Path
    sheet_path: Path
    table: str


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(metrics: dict[str, Any]) -> str:
    """Per defect type: count, FID, KID, the diversity IC-FD and the pixels changed outside the mask."""
    head = f"{'defect type':<16} {'n':>5} {'FID':>8} {'KID':>17} {'IC-FD':>7} {'changed outside mask':>21}"
    rows = [head, "-" * len(head)]
    for name, m in metrics["types"].items():
        kid = m["kid"]
        kid_text = "-" if not kid else f"{kid['mean']:.4f}" + ("" if kid["std"] is None else f" ± {kid['std']:.4f}")
        rows.append(
            f"{name:<16} {m['count']:>5} {_number(m['fid'], '.1f'):>8} {kid_text:>17} "
            f"{_number(m['ic_fd']['value'], '.4f'):>7} {m['alignment']['changed_outside_mask']:>21}"
        )
        if m.get("note"):
            rows.append(f"  note: {m['note']}")
    rows.append(f"IC-FD: {metrics['diversity']['name']}")
    rows.append(f"Inception Score: not computed ({metrics['inception_score']['reason']})")
    return "\n".join(rows)


def generate_evaluate_run(
    target: str | os.PathLike[str],
    *,
    real: str | os.PathLike[str] | None = None,
    count: int = 32,
    image_size: int = 256,
    json_out: str | os.PathLike[str] | None = None,
    sheet: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Log = quiet,
) -> GenerateEvaluation:
    """Evaluate the generated folder ``target`` (or sample ``count`` per type from the generator ``target``).

    Metrics are written to ``json_out`` (default ``OUT/generation_metrics.json``) and a contact
    sheet of the real defects each type learnt from beside generated pairs to ``sheet`` (default
    ``OUT/contact_sheet.html``). Sampling and the feature networks of the metrics run on ``device``.
    """
    device = check_device(device)
    folder = Path(target).expanduser()
    if not (folder / MANIFEST).is_file() and (folder / "config.json").is_file():
        samples = folder / "evaluation"
        if (samples / MANIFEST).is_file():
            log(f"evaluating the pairs sampled earlier into {samples}")
        else:
            log(f"sampling {count} images per defect type into {samples}")
            generate_sample_run(folder, count, samples, image_size=image_size, seed=seed, device=device, log=log)
        folder = samples
    manifest = read_manifest(folder)
    source = read_config(Path(manifest["generator"]))["fit_info"].get("source", {})
    real_dir = Path(real) if real is not None else Path(source.get("category", ""))
    if not real_dir.is_dir():
        raise DefectscopeError(f"{real_dir}: the real defects' category is not there; pass --real DIR")
    metrics = evaluate_generated(folder, real_dir, image_size=image_size, device=device)
    json_path = Path(json_out) if json_out is not None else folder / "generation_metrics.json"
    atomic_write_json(json_path, metrics)
    generated = generated_pairs(folder)
    groups = {}
    for name, learnt in source.get("defects", {}).items():
        pairs = [(p.image, p.mask) for p in generated if p.defect_type == name]
        if pairs:
            groups[name] = ([(Path(e["image"]), Path(e["mask"])) for e in learnt], pairs[:SHEET_PAIRS])
    sheet_path = Path(sheet) if sheet is not None else folder / "contact_sheet.html"
    contact_sheet(groups, sheet_path, f"Generated defects: {real_dir.name}", metrics=metrics)
    return GenerateEvaluation(metrics, json_path, sheet_path, _table(metrics))
