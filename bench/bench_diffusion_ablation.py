"""Where a fitted DDAD run's accuracy goes: the same UNet under other inference settings and distances.

The test split is reconstructed once at the run's settings; the distance variants (pixel only,
feature only with the adapted or the frozen extractor, features at a larger resolution, blur,
image-score pooling, the pixel share) are computed from those reconstructions. Then the start
step and the conditioning weight are varied, each a new reconstruction of the test split. No
retraining: fit the run first, e.g.

    defectscope fit ../shared/datasets/mtd/magnetic_tile --method ddad --out /tmp/ddad_mtd --set time_budget=300 \
        --set space=pixel --set prediction=epsilon --set image_size=64 --set unet=small --set blur_sigma=1 \
        --set 'layers=["s4","s8"]' --set ema_decay=0.999 --set batch_size=16
    python bench/bench_diffusion_ablation.py /tmp/ddad_mtd ../shared/datasets/mtd/magnetic_tile

Writes ``bench/results/diffusion_ablation_<run name>.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common import environment, write_json

REPO = Path(__file__).resolve().parents[1]
Maps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def main(argv: Sequence[str] | None = None) -> None:
    from defectscope import load
    from defectscope.backbones import create_backbone
    from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
    from defectscope.methods import DDAD
    from defectscope.nn import diffusion as dm
    from defectscope.postprocess import gaussian_blur

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a DDAD run folder")
    parser.add_argument("data", type=Path, help="the category folder it was fitted on")
    args = parser.parse_args(argv)
    det = load(args.run)
    if not isinstance(det, DDAD):
        raise SystemExit(f"{args.run}: a {det.name} run; this bench takes a DDAD run")
    if det.space != "pixel":
        raise SystemExit(f"{args.run}: a feature-space DDAD; this bench takes a pixel-space one (--set space=pixel)")
    samples = mvtec_samples(args.data, "test")
    labels = np.array([s.label for s in samples])
    batches = list(iterate_batches(ImageDataset(samples, det.image_size), 32))
    x, masks = torch.cat([b["image"] for b in batches]), torch.cat([b["mask"] for b in batches])
    pixel_labels = masks.flatten().numpy()
    rows: list[dict[str, Any]] = []

    def chunks(fn: Maps, r: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(x[i : i + 32], r[i : i + 32]) for i in range(0, len(x), 32)])

    def row(name: str, maps: torch.Tensor, **extra: Any) -> None:
        flat = maps.flatten(1)
        top = flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(1)
        rows.append(
            {
                "variant": name,
                "image_auroc": auroc(labels, flat.amax(1).numpy()),
                "image_auroc_top1pct": auroc(labels, top.numpy()),
                "pixel_auroc": auroc(pixel_labels, maps.flatten().numpy()) if pixel_labels.any() else None,
                **extra,
            }
        )
        print(f"{name:70s} image {rows[-1]['image_auroc']:.3f} pixel {rows[-1]['pixel_auroc'] or float('nan'):.3f}")

    def reconstruct() -> tuple[torch.Tensor, dict[str, float]]:
        start = time.perf_counter()
        r = torch.cat([det.reconstruct(x[i : i + 32]) for i in range(0, len(x), 32)])
        diff = (x - r).abs().mean((1, 2, 3)).numpy()
        facts = {
            "seconds": round(time.perf_counter() - start, 1),
            "mean_abs_difference_good": float(diff[labels == 0].mean()),
            "mean_abs_difference_defect": float(diff[labels == 1].mean()),
        }
        return r, facts

    frozen: dict[tuple[str, ...], torch.nn.Module] = {}

    def feature_only(layers: tuple[str, ...], size: int, adapted: bool = False) -> Maps:
        if adapted:
            extractor = det.feature_extractor
        else:
            extractor = frozen.setdefault(layers, create_backbone(det.backbone, layers=layers).eval())

        def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = a.shape[-2:]
            if size != a.shape[-1]:
                a, b = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (a, b))
            return gaussian_blur(dm.feature_distance(extractor(a), extractor(b), out), det.blur_sigma)

        return fn

    r, facts = reconstruct()
    row("as fitted", chunks(det.anomaly_map, r), **facts)
    row("pixel distance only", chunks(lambda a, b: gaussian_blur(dm.pixel_distance(a, b), det.blur_sigma), r))
    row("feature distance only, adapted extractor", chunks(feature_only(det.layers, det.image_size, True), r))
    row("feature distance only, frozen extractor", chunks(feature_only(det.layers, det.image_size), r))
    for size in (128, 256):
        for layers in (("s4", "s8"), ("s8", "s16")):
            row(f"frozen features at {size} px, {'+'.join(layers)}", chunks(feature_only(layers, size), r))
    with torch.no_grad():
        dp, df = (
            torch.cat(t) for t in zip(*[det._distances(x[i : i + 32], r[i : i + 32]) for i in range(0, len(x), 32)])
        )
    ratio = float(det.ratio)
    for v in (0.0, 0.5, det.v, 2.0):
        for sigma in (det.blur_sigma, 4.0):
            if (v, sigma) == (det.v, det.blur_sigma):
                continue  # the fitted map
            row(f"pixel share v={v}, blur {sigma}", gaussian_blur(v * ratio * dp + df, sigma))
    fitted = det.t_start, det.w
    for t_start, w in ((250, 0.0), (400, 4.0), (400, 1.0), (600, 1.0)):
        if (t_start, w) == fitted:
            continue
        det.t_start, det.w = t_start, w
        r, facts = reconstruct()
        row(f"start step {t_start}, w={w}", chunks(det.anomaly_map, r), **facts)
    det.t_start, det.w = fitted
    out = REPO / "bench" / "results" / f"diffusion_ablation_{args.run.name}.json"
    write_json(
        out,
        {
            "command": f"python bench/bench_diffusion_ablation.py {args.run} {args.data}",
            "date": str(date.today()),
            "environment": environment(),
            "params": det.get_params(),
            "fit_info": det.fit_info,
            "rows": rows,
        },
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
