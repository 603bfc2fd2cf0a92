"""``defectscope export``: a run as one self-contained ONNX graph, checked against the torch model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ExportedModelError, OutputError
from .common import add_overwrite, info, positive_int


def _check_out(path: Path, overwrite: bool) -> None:
    """An earlier defectscope export may be replaced; any other file only with ``--overwrite``."""
    from ..export.onnx_file import read_exported

    if not path.exists() or overwrite:
        return
    try:
        read_exported(path)
    except ExportedModelError:
        raise OutputError(f"{path}: exists and is not a defectscope export; pass --overwrite to replace it") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..engines import require_onnx

    require_onnx("defectscope export")
    from ..export.build import export_detector, int8_samples
    from ..export.onnx_file import DEFAULT_NAMES, write_exported
    from ..export.parity import compare
    from ..methods import load
    from ..methods.model_file import read_config

    run_dir = Path(args.run)
    detector = load(run_dir)
    out = Path(args.out) if args.out else run_dir / DEFAULT_NAMES[args.int8]
    _check_out(out, args.overwrite)
    exported = export_detector(detector, read_config(run_dir)["tensors_sha256"], int8=args.int8)
    if not args.no_check:
        samples = int8_samples(detector, args.check_images)
        images = torch.cat([b["image"] for b in _batches(detector, samples)])
        from ..engines.onnxruntime import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(exported, detector, True, torch.get_num_threads())
        parity = compare(detector, engine, images)
        detector.engine = None
        info(f"onnxruntime vs torch on {parity.describe()}")
        if not args.int8 and not parity.within_bounds:
            raise ExportedModelError(
                f"{run_dir}: the exported graph does not agree with the model ({parity.describe()}); nothing written"
            )
    write_exported(exported.model, out)
    size = out.stat().st_size / 2**20
    info(f"wrote {out} ({size:.1f} MiB; {detector.name}, threshold and geometry in its metadata)")
    return 0


def _batches(detector: Any, samples: list[Any]) -> Any:
    from ..data import iterate_batches

    return iterate_batches(detector.fit_dataset(samples), 8)


def add_parser(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="export a run as one ONNX graph (images -> scores and maps) for onnxruntime / OpenVINO",
        description="Export a fitted run as one self-contained ONNX graph: input normalisation, backbone, the "
        "method's head, upsampling and smoothing; input images (batch, 3, S, S) RGB in [0, 1], outputs scores "
        "(batch,) and maps (batch, S, S). The threshold, input geometry, method, parameters, defectscope version "
        "and the sha256 of the run's tensors are in the file's metadata (defectscope.*), not in the graph. Before "
        "writing, the graph runs in onnxruntime on good training images and must agree with the torch model "
        "(scores within 1e-4 relative, maps within 1e-3 of the threshold, same verdicts). Exportable: "
        + ", ".join(_exportable())
        + ".",
    )
    export.add_argument("run", metavar="RUN", help="run folder written by `defectscope fit`")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default: %(default)s)")
    export.add_argument(
        "--out", metavar="FILE", help="where to write it (default: RUN/model.onnx, RUN/model.int8.onnx with --int8)"
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="quantise the backbone to int8 (static, calibrated on the run's good training images); "
        "the parity check then reports the differences instead of requiring the fp32 bounds",
    )
    export.add_argument(
        "--check-images",
        type=positive_int,
        default=8,
        metavar="N",
        help="good images for the parity check (default: 8)",
    )
    export.add_argument("--no-check", action="store_true", help="skip the parity check")
    add_overwrite(export, "the exported file")
    export.set_defaults(func=run)


def _exportable() -> list[str]:
    from ..methods import METHODS

    return sorted(name for name, cls in METHODS.items() if cls.export_unsupported is None)
