"""``defectscope fit``: fit a method on good images and save the run folder."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from ..errors import DefectscopeError
from ..methods import METHODS
from ..records import NO_THRESHOLD_NOTE
from ..runs import fit_run
from ..thresholds import chosen_rule
from .common import add_device, add_overwrite, info, positive_int
from .geometry_args import add_geometry_args, geometry_from_args

DEFAULT_METHOD = "patchcore"
#: Shorthand flags for common method parameters: each is ``--set NAME=VALUE`` for the chosen method.
ALIASES = {
    "backbone": "feature extractor, e.g. efficientnet_lite0 (default), mobilenet_v2, resnet18, wide_resnet50_2",
    "weights": "explicit backbone weights file (else $DEFECTSCOPE_WEIGHTS_DIR, installed packages, download)",
    "image_size": "square input size in pixels, a multiple of 16 (default: the method's own)",
    "batch_size": "images per batch (default 16)",
    "seed": "random seed (default 0)",
    "epochs": "trained methods: number of training epochs",
    "time_budget": "trained methods: stop training after this many seconds (counted across resumes)",
    "coreset_ratio": "memory-bank methods: fraction of patches kept (default 0.1)",
    "threshold_rule": "how held-out scores set the threshold: conformal (default), mean_sigma or recall",
    "false_alarm_rate": "conformal rule: share of good images allowed to be judged anomalous (default 0.05)",
    "false_alarm_confidence": "conformal rule: keep this calibration's rate under A with this probability",
    "target_recall": "recall rule (chosen by this flag): share of defects to catch, from held-out labelled defects",
    "threshold_sigmas": "mean_sigma rule (chosen by this flag): threshold = mean + this many sd (default 3)",
}


def _params_epilog() -> str:
    lines = ["method parameters, as NAME=DEFAULT (TYPE); set any with --set NAME=VALUE:"]
    for name, cls in METHODS.items():
        line = f"  {name}:"
        for spec in cls.param_specs():
            entry = f" {spec.name}={spec.format(spec.default)} ({spec.type_name})"
            if len(line) + len(entry) > 100:
                lines.append(line)
                line = "     "
            line += entry
        lines.append(line)
    return "\n".join(lines)


def method_params(method: str, sets: list[str], aliases: dict[str, str | None]) -> dict[str, Any]:
    """Constructor keywords from ``--set KEY=VALUE`` and the shorthand flags, parsed by the method's specs."""
    specs = {spec.name: spec for spec in METHODS[method].param_specs()}
    params: dict[str, Any] = {}
    raw_pairs = [(f"--set {pair}", *pair.partition("=")) for pair in sets]
    raw_pairs += [
        (f"--{key.replace('_', '-')}", key, "=", value) for key, value in aliases.items() if value is not None
    ]
    for origin, key, sep, raw in raw_pairs:
        key = key.strip().replace("-", "_")
        if not sep:
            raise DefectscopeError(f"{origin!r}: expected KEY=VALUE")
        if key not in specs:
            raise DefectscopeError(f"{origin}: {method} has no parameter {key!r} (has: {', '.join(sorted(specs))})")
        params[key] = specs[key].parse(raw.strip())
    return params


def run(args: argparse.Namespace) -> int:
    aliases = {key: getattr(args, key) for key in ALIASES}
    params = method_params(args.method, args.set, aliases)
    try:
        rule = chosen_rule(params.get("threshold_rule"), params)
    except ValueError as exc:
        raise DefectscopeError(str(exc)) from None
    if rule is not None:
        params["threshold_rule"] = rule
    geometry = geometry_from_args(args, params)
    shards = None
    if args.engine == "ray":
        from ..distributed import RayShards

        shards = RayShards(args.workers, args.threads_per_worker, args.address)
    result = fit_run(
        args.data,
        args.out,
        method=args.method,
        params=params,
        category=args.category,
        categories=args.categories,
        labelled_defects=args.labelled_defects or 0,
        geometry=geometry,
        defects_from=args.defects_from,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        shards=shards,
        log=info,
    )
    if result.threshold is None:
        info(f"note: {NO_THRESHOLD_NOTE}")
    calibration = result.detector.calibration
    threshold = calibration.describe() if calibration is not None else "threshold: none (no held-out images)"
    detector = result.detector
    print(
        f"fitted in {result.info.fit_seconds:.1f} s on {result.info.n_fit_images} images "
        f"({detector.geometry.describe(detector.image_size)}); {threshold}\n"
        f"saved to {result.folder}"
    )
    return 0


def add_parser(sub: Any) -> None:
    fit = sub.add_parser(
        "fit",
        help="fit a detector on good images and save it to a run folder",
        description=textwrap.fill(
            "Fit a detector on the good images of DATA and save it (config.json + model.safetensors) to --out. "
            "A held-out slice of the good images (--set calibration_fraction, default 0.1) sets the decision "
            "threshold: by default the conformal rule for a false-alarm rate of 0.05 (--false-alarm-rate), which "
            "bounds the share of good images judged anomalous; `defectscope calibrate` re-sets it later.",
            width=100,
        ),
        epilog=_params_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument(
        "data",
        metavar="DATA",
        nargs="+",
        help="an MVTec-layout category folder (uses train/good), a "
        "dataset root holding categories (with --category / --categories) or a plain folder of good "
        "images; several DATA folders train one unified model over all of them",
    )
    fit.add_argument(
        "--out",
        required=True,
        metavar="RUN",
        help="run folder to write the model to (new, empty, or "
        "an earlier run folder; one holding a fitted model only with --overwrite)",
    )
    fit.add_argument(
        "--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="detection method (default: %(default)s)"
    )
    fit.add_argument("--category", help="category to use when DATA is a root holding several")
    fit.add_argument(
        "--categories",
        metavar="all|A,B",
        help="one unified model over these categories of the root "
        "DATA (all of them with 'all'); `test` then reports each category and the mean",
    )
    fit.add_argument(
        "--labelled-defects",
        type=positive_int,
        metavar="K",
        help="K labelled defect images (with masks) per category, taken from --defects-from or else from the "
        "test split and then left out of `test`: methods that learn from defects (dmad) learn from them; the "
        "others hold them out to measure the miss rate at the threshold (and set it, with --target-recall)",
    )
    fit.add_argument(
        "--defects-from",
        metavar="DIR",
        help="MVTec-layout category (or root of categories) to take the labelled defects from",
    )
    for key, text in ALIASES.items():
        fit.add_argument(f"--{key.replace('_', '-')}", metavar="VALUE", help=f"{text}; = --set {key}=VALUE")
    fit.add_argument(
        "--resume",
        action="store_true",
        help="trained methods: continue from the last checkpoint in RUN/checkpoint instead of starting over",
    )
    add_geometry_args(fit)
    add_overwrite(fit, "the model")
    add_device(fit)
    engine = fit.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=("torch", "ray"),
        default="torch",
        help="torch: one process (default); ray: on Ray workers - padim merges their per-position sums "
        "exactly, patchcore builds a composable coreset (each worker's coreset, then the coreset of their union)",
    )
    engine.add_argument(
        "--address", metavar="ADDR", help="with --engine ray: a running cluster (auto, ray://HOST:PORT)"
    )
    engine.add_argument("--workers", type=positive_int, default=2, metavar="N", help="with --engine ray (default: 2)")
    engine.add_argument(
        "--threads-per-worker", type=positive_int, default=1, metavar="N", help="with --engine ray (default: 1)"
    )
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any method parameter (see below)")
    fit.set_defaults(func=run)
