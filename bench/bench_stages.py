"""The stages of PatchCore's test pass on bottle, each alone: decode, backbone (torch / onnxruntime), search.

The issue's yardstick for the end-to-end figure: ``test --no-overlays`` with the onnxruntime engine
should take at most 1.3 x (decode alone + backbone alone). Measured here, best of ``--repeats``:

- decode: the test images opened as ``inspect`` opens them (PNG decode, resize, mask), 2 threads;
- backbone: the patch embeddings of the decoded images in batches of 16, torch and the exported graph
  up to its ``embeddings`` output in onnxruntime;
- search and maps: PatchCore's faiss search, re-weighting and maps from the embeddings.

    python bench/bench_stages.py --run /tmp/x/pc_bottle
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import environment

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "stages.json"


def best(step: Any, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a PatchCore run folder fitted on bottle")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "mvtec_bottle" / "bottle"))
    parser.add_argument("--repeats", type=int, default=3)
    import defectscope  # noqa: F401  (process settings before torch loads)

    args = parser.parse_args()
    import torch

    from defectscope.data.dataset import ordered_items
    from defectscope.data.sources import labelled_samples
    from defectscope.engines import EngineChoice, use_engine
    from defectscope.geometry.inspect import _Files
    from defectscope.methods import load

    detector = load(args.run)
    samples = labelled_samples(Path(args.data))
    files = _Files(samples, detector.geometry, detector.image_size, False, True)
    n = len(samples)
    decoded: list[torch.Tensor] = []

    def decode() -> None:
        decoded.clear()
        decoded.extend(item.views.get(0, 1) for _, item in ordered_items(files, 2, window=32))

    t_decode = best(decode, args.repeats)
    images = torch.cat(decoded)
    batches = list(images.split(16))

    def embed_torch() -> None:
        for batch in batches:
            detector.embed(batch)

    t_torch = best(embed_torch, args.repeats)
    use_engine(detector, EngineChoice("onnxruntime"), args.run)
    engine = detector.engine
    assert engine is not None and getattr(engine, "handover", None) == "embeddings"
    embeddings = [torch.from_numpy(engine._run(["embeddings"], b.numpy())[0]) for b in batches]  # type: ignore[attr-defined]

    def embed_onnx() -> None:
        for batch in batches:
            engine._run(["embeddings"], batch.numpy())  # type: ignore[attr-defined]

    t_onnx = best(embed_onnx, args.repeats)

    def search() -> None:
        for emb in embeddings:
            detector._predict_from_handover(emb)

    t_search = best(search, args.repeats)
    result = {
        "run": args.run,
        "n_images": n,
        "images_per_second": {
            "decode (2 threads)": round(n / t_decode, 1),
            "backbone torch": round(n / t_torch, 1),
            "backbone onnxruntime": round(n / t_onnx, 1),
            "search + maps (faiss)": round(n / t_search, 1),
        },
        "ms_per_image": {
            "decode": round(1000 * t_decode / n, 2),
            "backbone_torch": round(1000 * t_torch / n, 2),
            "backbone_onnxruntime": round(1000 * t_onnx / n, 2),
            "search_and_maps": round(1000 * t_search / n, 2),
        },
        "yardstick_images_per_second": round(n / (1.3 * (t_decode + t_onnx)), 1),
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d"),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(result["images_per_second"]),
        "-> 1.3 x (decode + onnx backbone):",
        result["yardstick_images_per_second"],
    )


if __name__ == "__main__":
    main()
