"""PatchCore memory banks at a million patches: memory, build time, query time and recall of each index.

The bank is every patch embedding of the 762 good training images of ``mtd`` at 288 px (36 x 36
patches each: 987,552 patches of 152 dimensions, no coreset), the queries every patch of 16 of its
test images (8 good, 8 defective: 20,736). Exact search (faiss flat) gives the true nearest patch;
each index is then built and queried in a process of its own, one image (1,296 patches) per call,
and measured: build seconds, resident memory (anonymous and file-backed), milliseconds per image,
recall@1 (the exact nearest patch, or one at the same distance) and the relative error of the
nearest distance, which is what PatchCore's scores are made of.

``--method-check`` also fits PatchCore at its defaults on ``mtd`` once and tests it with the default
index and with ``search_index=ivfpq`` on the same bank (image and pixel AUROC). Writes
``bench/results/bank.json``.

    python bench/bench_bank.py                 # all rows (about 20 minutes on 2 cores)
    python bench/bench_bank.py --rows ivfpq,ivfpq-mmap --method-check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from common import add_datasets_root, environment, finish_summary, write_json

REPO = Path(__file__).resolve().parents[1]
ROWS = ("flat", "ivf", "ivfpq", "ivfpq-mmap", "hnsw")
IMAGE_SIZE = 288
PER_IMAGE = (IMAGE_SIZE // 8) ** 2


def memory() -> dict[str, float]:
    """This process's resident memory now (anonymous, file-backed) and at its peak, in MB."""
    status = {
        line.split(":")[0]: int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()[1:]
        if line.split(":")[0] in ("RssAnon", "RssFile")
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"anon_mb": status["RssAnon"] / 1024, "file_mb": status["RssFile"] / 1024, "peak_mb": peak / 1024}


def prepare(data: Path, work: Path) -> dict[str, Any]:
    """Bank, queries and the exact answers (cached in ``work``)."""
    import faiss
    import torch
    from safetensors.numpy import save_file

    from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
    from defectscope.methods import PatchCore

    facts_file = work / "prepared.json"
    if facts_file.exists():
        return json.loads(facts_file.read_text())
    work.mkdir(parents=True, exist_ok=True)
    detector = PatchCore(image_size=IMAGE_SIZE)

    def patches(samples: list[Any]) -> np.ndarray:
        chunks = []
        for batch in iterate_batches(ImageDataset(samples, IMAGE_SIZE), 16, desc="extracting"):
            with torch.no_grad():
                emb = detector.embed(batch["image"])
            chunks.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).numpy())
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)

    start = time.perf_counter()
    bank = patches(mvtec_samples(data, "train"))
    extract_s = time.perf_counter() - start
    test = mvtec_samples(data, "test")
    chosen = [s for s in test if s.label == 0][:8] + [s for s in test if s.label == 1][:8]
    queries = patches(chosen)
    np.save(work / "bank.npy", bank)
    np.save(work / "queries.npy", queries)
    save_file({"memory_bank": bank}, str(work / "bank.safetensors"))
    faiss.omp_set_num_threads(torch.get_num_threads())
    flat = faiss.IndexFlatL2(bank.shape[1])
    flat.add(bank)
    start = time.perf_counter()
    dist, idx = flat.search(queries, 1)
    exact_s = time.perf_counter() - start
    np.save(work / "exact_dist.npy", np.sqrt(np.maximum(dist[:, 0], 0)))
    np.save(work / "exact_idx.npy", idx[:, 0])
    facts = {
        "bank": list(bank.shape),
        "queries": len(queries),
        "images": len(chosen),
        "extract_s": round(extract_s, 1),
        "exact_ms_per_image": round(1000 * exact_s / len(chosen), 1),
    }
    facts_file.write_text(json.dumps(facts))
    return facts


def run_row(row: str, work: Path) -> dict[str, Any]:
    """Build one index, query it one image at a time, measure it (in this process)."""
    import faiss
    import torch

    from defectscope.nn.compressed_index import IvfPqParts, train_ivfpq
    from defectscope.nn.knn import NearestNeighbors
    from defectscope.tensor_file import read_tensors

    queries = np.load(work / "queries.npy")
    exact_dist, exact_idx = np.load(work / "exact_dist.npy"), np.load(work / "exact_idx.npy")
    faiss.omp_set_num_threads(torch.get_num_threads())
    before = memory()
    start = time.perf_counter()
    if row == "ivfpq-mmap":
        pq_file = work / "ivfpq.safetensors"
        if not pq_file.exists():
            raise SystemExit("ivfpq-mmap needs the ivfpq row first (it writes the codes)")
        tensors = read_tensors(str(pq_file), {"memory_bank"})
        parts = IvfPqParts(tensors["ivfpq_centroids"], tensors["ivfpq_codebooks"], tensors["ivfpq_codes"])
        index: Any = NearestNeighbors(tensors["memory_bank"], compressed=parts)
    else:
        bank = torch.from_numpy(np.load(work / "bank.npy"))
        if row == "ivfpq":
            parts = train_ivfpq(bank.numpy())
            index = NearestNeighbors(bank, compressed=parts)
            from safetensors.torch import save_file

            save_file(
                {
                    "memory_bank": bank,
                    "ivfpq_centroids": parts.centroids,
                    "ivfpq_codebooks": parts.codebooks,
                    "ivfpq_codes": parts.codes,
                },
                str(work / "ivfpq.safetensors"),
            )
        elif row == "hnsw":
            hnsw = faiss.IndexHNSWFlat(bank.shape[1], 32)
            hnsw.hnsw.efConstruction = 64
            hnsw.add(bank.numpy())
            hnsw.hnsw.efSearch = 64
            del bank
            index = hnsw
        else:
            index = NearestNeighbors(bank, exact=row == "flat")
    build_s = time.perf_counter() - start
    built = memory()
    dist, idx = [], []
    start = time.perf_counter()
    for a in range(0, len(queries), PER_IMAGE):
        q = queries[a : a + PER_IMAGE]
        if row == "hnsw":
            d, i = index.search(q, 1)
            dist.append(np.sqrt(np.maximum(d[:, 0], 0)))
            idx.append(i[:, 0])
        else:
            found = index.search(torch.from_numpy(q), 1)
            dist.append(found.distances[:, 0].numpy())
            idx.append(found.indices[:, 0].numpy())
    query_s = time.perf_counter() - start
    found_d, found_i = np.concatenate(dist), np.concatenate(idx)
    rel = np.abs(found_d - exact_dist) / np.maximum(exact_dist, 1e-12)
    hit = (found_i == exact_idx) | (rel <= 1e-5)
    after = memory()
    return {
        "row": row,
        "build_s": round(build_s, 1),
        "ms_per_image": round(1000 * query_s / (len(queries) / PER_IMAGE), 1),
        "recall_at_1": round(float(hit.mean()), 4),
        "distance_rel_error_mean": float(rel.mean()),
        "distance_rel_error_p99": float(np.quantile(rel, 0.99)),
        "memory_before_mb": {k: round(v, 1) for k, v in before.items()},
        "memory_built_mb": {k: round(v, 1) for k, v in built.items()},
        "memory_after_queries_mb": {k: round(v, 1) for k, v in after.items()},
        "status": "ok",
    }


def method_check(data: Path, work: Path) -> dict[str, Any]:
    """PatchCore at its defaults on ``data``, tested with the default index and with IVF-PQ on the same bank."""
    from defectscope.methods import load
    from defectscope.runs import evaluate_run, fit_run

    run = work / "patchcore-default"
    if not (run / "config.json").exists():
        fit_run(data, run, method="patchcore", overwrite=True)
    compressed = work / "patchcore-ivfpq"
    detector = load(run)
    detector.search_index = "ivfpq"
    start = time.perf_counter()
    detector._index = detector._make_index(detector.memory_bank, None)
    build_s = time.perf_counter() - start
    detector.save(compressed)
    out: dict[str, Any] = {"bank": len(detector.memory_bank), "ivfpq_build_s": round(build_s, 1)}
    for name, folder in (("default", run), ("ivfpq", compressed)):
        result = evaluate_run(folder, data, out=work / f"test-{name}", overlays=False, overwrite=True)
        out[name] = {k: round(result.parts[0].metrics[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")}
        out[name]["images_per_second"] = round(result.parts[0].images_per_second, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_datasets_root(parser)
    parser.add_argument("--work", default="/tmp/defectscope-bank", help="cache of the bank and the runs")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"indexes to measure (default: {','.join(ROWS)})")
    parser.add_argument("--method-check", action="store_true", help="also test PatchCore on mtd with each index")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bank.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DEFECTSCOPE_NO_PROGRESS", "1")
    work, data = Path(args.work), Path(args.datasets_root) / "mtd" / "magnetic_tile"
    if args.row:
        print(json.dumps(run_row(args.row, work)))
        return 0
    out = Path(args.out)
    summary: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    summary |= {"date": date.today().isoformat(), "machine": environment(), "command": " ".join(sys.argv)}
    summary["prepared"] = prepare(data, work)
    rows = summary.setdefault("rows", {})
    for row in args.rows.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--row", row, "--work", str(work)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            rows[row] = {"row": row, "status": "failed", "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            rows[row] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[row]), flush=True)
        write_json(out, summary)
    if args.method_check:
        summary["method_check"] = method_check(data, work)
    lines = [f"{'index':<11} {'build s':>8} {'ms/img':>7} {'recall':>7} {'anon MB':>8} {'file MB':>8}"]
    for r in rows.values():
        if r.get("status") == "ok":
            mem = r["memory_after_queries_mb"]
            lines.append(
                f"{r['row']:<11} {r['build_s']:8.1f} {r['ms_per_image']:7.1f} {r['recall_at_1']:7.4f} "
                f"{mem['anon_mb']:8.0f} {mem['file_mb']:8.0f}"
            )
    finish_summary(out, summary, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
