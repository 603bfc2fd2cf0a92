"""Banks larger than memory: the IVF-PQ index kept as tensors, memory-mapped tensors, and PatchCore with both."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from defectscope.errors import DefectscopeError, ModelFileError, NotExportable
from defectscope.methods import PatchCore, load
from defectscope.nn.compressed_index import IvfPqParts, ivfpq_index, list_bytes, n_subquantizers, train_ivfpq
from defectscope.nn.knn import NearestNeighbors
from defectscope.runs import fit_run, predict_run
from defectscope.tensor_file import read_tensors


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)) * 4
    return (centres[rng.integers(0, 64, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_the_index_rebuilt_from_its_tensors_finds_near_exact_neighbours() -> None:
    bank = clustered(20000)
    parts = train_ivfpq(bank)
    assert parts.codebooks.shape == (n_subquantizers(32), 256, 4) and n_subquantizers(32) == 8
    assert parts.codes.shape == (20000, list_bytes(parts.centroids.shape[0]) + 8)
    index = NearestNeighbors(torch.from_numpy(bank), compressed=parts)
    queries = torch.from_numpy(clustered(500, seed=1))
    found = index.search(queries, 3)
    exact = NearestNeighbors(torch.from_numpy(bank), exact=True).search(queries, 3)
    assert (found.indices[:, 0] == exact.indices[:, 0]).float().mean() >= 0.9
    # the distances returned are exact distances to the rows returned, nearest first
    direct = torch.linalg.vector_norm(torch.from_numpy(bank)[found.indices] - queries[:, None], dim=2)
    assert torch.allclose(found.distances, direct, rtol=1e-5, atol=1e-5)
    assert bool((found.distances[:, 1:] >= found.distances[:, :-1]).all())
    again = NearestNeighbors(torch.from_numpy(bank), compressed=IvfPqParts(*(p.clone() for p in parts)))
    assert torch.equal(again.search(queries, 3).indices, found.indices)


def test_tensors_that_do_not_describe_an_index_are_refused() -> None:
    bank = clustered(4000)
    parts = train_ivfpq(bank)
    cells = parts.centroids.shape[0]
    bad_cell = parts.codes.clone()
    bad_cell[0, : list_bytes(cells)] = 255  # a cell number past the last cell
    with pytest.raises(ValueError, match="name cell 255 of an index of"):
        ivfpq_index(parts._replace(codes=bad_cell), 4000, 32)
    with pytest.raises(ValueError, match="ivfpq_codes must be"):
        ivfpq_index(parts._replace(codes=parts.codes[:10]), 4000, 32)
    with pytest.raises(ValueError, match="ivfpq_codebooks must be"):
        ivfpq_index(parts._replace(codebooks=parts.codebooks[:, :100]), 4000, 32)
    with pytest.raises(ValueError, match="ivfpq_centroids must be"):
        ivfpq_index(parts._replace(centroids=parts.centroids[:, :5]), 4000, 32)


def test_mapped_tensors_equal_the_file_and_are_mapped(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"bank": torch.randn(300, 8), "other": torch.arange(5)}
    save_file(tensors, str(path))
    read = read_tensors(str(path), {"bank"})
    assert torch.equal(read["bank"], tensors["bank"]) and torch.equal(read["other"], tensors["other"])
    assert str(path) in mapped_files()
    assert read_tensors(str(path)).keys() == load_file(str(path)).keys()
    # a header whose byte range runs past the end of the file
    save_file({"bank": tensors["bank"]}, str(path))
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["bank"]["data_offsets"][1] *= 10
    text = json.dumps(header).encode()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    with pytest.raises(ValueError, match="outside the file|does not hold"):
        read_tensors(str(broken), {"bank"})


def test_patchcore_with_a_compressed_bank_on_disk(example_root: Path, tmp_path: Path) -> None:
    params = {"image_size": 128, "coreset_ratio": 1.0}
    exact = fit_run(example_root, tmp_path / "exact", method="patchcore", params=params | {"search_index": "exact"})
    run = tmp_path / "pq"
    fit_run(example_root, run, method="patchcore", params=params | {"search_index": "ivfpq", "bank_on_disk": True})
    detector = load(run)
    assert detector.index.compressed is not None
    assert str((run / "model.safetensors").resolve()) in mapped_files()  # the bank is read from the file
    assert torch.equal(detector.memory_bank, exact.detector.memory_bank)
    want = {r.path: r.score for r in predict_run(tmp_path / "exact", [example_root]).records}
    got = {r.path: r.score for r in predict_run(run, [example_root]).records}
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) / want[k] for k in want) < 1e-3
    with pytest.raises(NotExportable, match="search_index=ivfpq"):
        detector.export_module()
    # the codes are part of the model: changing them is caught like any other change
    tensors = load_file(str(run / "model.safetensors"))
    tensors["ivfpq_codes"][0, 0] ^= 1
    save_file(tensors, str(run / "model.safetensors"))
    with pytest.raises(ModelFileError, match="checksum"):
        load(run)


def test_contradicting_index_settings_are_refused() -> None:
    with pytest.raises(DefectscopeError, match="bank_on_disk=true needs search_index=ivfpq"):
        PatchCore(bank_on_disk=True)
    with pytest.raises(DefectscopeError, match="contradict"):
        PatchCore(exact_search=True, search_index="ivfpq")
