"""AnomalyDiffusion's downstream test (Hu et al. 2024, Table 2): one localiser per source of defect pairs.

    python bench/bench_generate.py --dataset mvtec_bottle                    # perlin, cutpaste, croppaste
    python bench/bench_generate.py --dataset mtd --generated GEN_OUT         # plus the generated pairs
    python bench/bench_generate.py --dataset mvtec_bottle --quick            # a smoke run (64 px, 20 steps)

Per defect type the first third of the defect images is learnt from (Crop&Paste pastes their
regions; the generator behind ``--generated`` must have learnt from the same third), the other
two thirds plus the good test images are the evaluation set. Every source gives ``--count``
pairs; each trains the same localiser (DRAEM's discriminative U-Net on the image, focal loss,
good training images with all-zero masks plus the pairs) for the same number of steps with the
same seed, and the final model is evaluated once. ``--generated DIR`` is an MVTec-layout folder
(``test/<type>/*.png`` + ``ground_truth/<type>/*_mask.png``); without it that row is skipped.

Writes ``bench/results/generate_<dataset>.json`` (``generate_<dataset>_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from common import add_datasets_root, environment, f3, finish_summary, write_json

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"mvtec_bottle": "mvtec_bottle/bottle", "mtd": "mtd/magnetic_tile"}
SYNTH_SOURCES = ("perlin", "cutpaste", "croppaste")
SOURCES = ("generated", *SYNTH_SOURCES)
#: The paper's Table 2 (MVTec AD, all categories, its U-Net localiser): pixel AUROC / AP in %.
PAPER = {
    "generated (AnomalyDiffusion)": {"pixel_auroc": 99.1, "pixel_ap": 81.4},
    "DRAEM": {"pixel_auroc": 92.2, "pixel_ap": 54.1},
}
COUNT = 200
QUICK = {"count": 16, "image_size": 64, "steps": 20}
COLUMNS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc")


def say(text: str) -> None:
    print(f"{datetime.now():%H:%M:%S} {text}", flush=True)


def synth_pairs(split: Any, kind: str, count: int, out: Path, image_size: int, seed: int) -> list[tuple[Path, Path]]:
    """``count`` pairs of one synthetic kind written under ``out`` (Crop&Paste from the learning third only)."""
    from defectscope.generate.localiser_data import folder_pairs, learning_folder
    from defectscope.runs.synthesis import synth_run

    extra: dict[str, Any] = {}
    if kind == "croppaste":
        extra = {"defects": learning_folder(split, out / "learning"), "defect_images": split.n_learn}
    result = synth_run(split.category, kind, count, out / kind, image_size=image_size, seed=seed, **extra)
    if result.unchanged:
        say(f"{kind}: {result.unchanged} of {count} images came out unchanged (empty mask)")
    return folder_pairs(out / kind)


def run_source(split: Any, pairs: list[tuple[Path, Path]], settings: Any) -> dict[str, Any]:
    """Train one localiser on the good training images plus ``pairs`` and evaluate it once."""
    from defectscope.generate.localiser import evaluate_localiser, train_localiser

    model = train_localiser([s.path for s in split.good], pairs, settings, log=say)
    start = time.perf_counter()
    metrics = evaluate_localiser(model, split.evaluation, settings)
    log = model.training_log
    assert log is not None  # train_localiser always sets it
    return {
        "pairs": len(pairs),
        **metrics,
        "train_seconds": round(log.seconds, 1),
        "stopped_by": log.stopped_by,
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def table(summary: dict[str, Any]) -> str:
    head = "| source | pairs | pixel AUROC | pixel AP | pixel F1-max | AUPRO | image AUROC | train s |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary["sources"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} |")
            continue
        cells = " | ".join(f3(row[key]) for key in COLUMNS)
        lines.append(f"| {name} | {row['pairs']} | {cells} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from defectscope.errors import DefectscopeError
    from defectscope.generate.localiser import LocaliserSettings
    from defectscope.generate.localiser_data import folder_pairs, localiser_split

    default = LocaliserSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_datasets_root(parser)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument(
        "--generated", type=Path, help="MVTec-layout folder of generated pairs (default: skip that row)"
    )
    parser.add_argument("--count", type=int, help=f"pairs per source (default {COUNT}; {QUICK['count']} with --quick)")
    parser.add_argument("--steps", type=int, help=f"training steps per localiser, the budget (default {default.steps})")
    parser.add_argument("--budget", type=float, help="seconds: a cap on each localiser's training (default: none)")
    parser.add_argument("--image-size", type=int, help=f"working size in px (default {default.image_size})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 pairs, 64 px, 20 steps")
    parser.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated sources to (re)run; the rows of the others are kept from an earlier results file "
        "made with the same settings (default: all)",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.sources.split(",") if name.strip()]
    if not chosen or any(name not in SOURCES for name in chosen):
        parser.error(f"--sources: choose from {', '.join(SOURCES)}")

    quick: dict[str, int] = QUICK if args.quick else {}
    count = args.count or quick.get("count", COUNT)
    settings = LocaliserSettings(
        image_size=args.image_size or quick.get("image_size", default.image_size),
        steps=args.steps or quick.get("steps", default.steps),
        time_budget=args.budget,
        seed=args.seed,
    )
    split = localiser_split(Path(args.datasets_root) / DATASETS[args.dataset])
    out = REPO / "bench" / "results" / f"generate_{args.dataset}{'_quick' if args.quick else ''}.json"
    n_defects = sum(s.label for s in split.evaluation)
    summary: dict[str, Any] = {
        "command": "python bench/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": str(date.today()),
        "environment": environment(),
        "dataset": args.dataset,
        "category": str(split.category),
        "settings": settings.as_dict() | {"count": count},
        "split": {
            "learn_per_type": {name: len(examples) for name, examples in split.learn.items()},
            "good_train": len(split.good),
            "evaluation_good": len(split.evaluation) - n_defects,
            "evaluation_defects": n_defects,
        },
        "paper_table2_mvtec_all": PAPER,
        "sources": {},
    }
    if args.generated is not None and (args.generated / "generated.json").is_file():
        manifest = json.loads((args.generated / "generated.json").read_text())
        fitted = json.loads((Path(manifest["generator"]) / "config.json").read_text())
        info = fitted["fit_info"]
        summary["generated"] = {
            "folder": str(args.generated),
            "pairs_per_type": {
                t: sum(p["defect_type"] == t for p in manifest["pairs"]) for t in fitted["defect_types"]
            },
            "image_size": manifest["image_size"],
            "generator_settings": fitted["settings"],
            "fit_seconds": info.get("seconds"),
            "image_model_steps": info.get("image", {}).get("steps"),
            "mask_model_steps": info.get("mask", {}).get("steps"),
        }
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    if earlier.get("settings") == summary["settings"] and earlier.get("split") == summary["split"]:
        summary["sources"] = {k: v for k, v in earlier.get("sources", {}).items() if k not in chosen}
        summary["earlier_rows"] = {k: earlier.get("date") for k in summary["sources"]}
    elif len(chosen) < len(SOURCES):
        parser.error(f"{out}: no earlier results with these settings to keep the other sources from; run all")
    learning = summary["split"]["learn_per_type"]
    say(
        f"{args.dataset}: {len(split.good)} good training images, learning defects {learning}, "
        f"evaluation {n_defects} defects + {len(split.evaluation) - n_defects} good"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        for source in (name for name in SOURCES if name in chosen):
            source_start = time.perf_counter()
            try:
                if source == "generated":
                    if args.generated is None:
                        raise DefectscopeError("no --generated DIR given")
                    pairs = folder_pairs(args.generated, count)
                else:
                    pairs = synth_pairs(split, source, count, Path(tmp), settings.image_size, args.seed)
            except DefectscopeError as exc:
                summary["sources"][source] = {"skipped": str(exc)}
                say(f"{source}: skipped ({exc})")
                continue
            say(f"{source}: {len(pairs)} pairs")
            row = run_source(split, pairs, settings)
            row["wall_seconds"] = round(time.perf_counter() - source_start, 1)
            summary["sources"][source] = row
            say(
                f"{source}: "
                + ", ".join(f"{key} {row[key]:.3f}" for key in COLUMNS)
                + f" ({row['wall_seconds']:.0f} s)"
            )
            write_json(out, summary)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    finish_summary(out, summary, table(summary))


if __name__ == "__main__":
    main()
