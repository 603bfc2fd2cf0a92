"""The ONNX graphs of the methods beyond PatchCore and PaDiM (those are in test_export.py) agree with torch.

Each method is fitted small (a few of the bundled example's good images, tiny networks, one or a few
epochs), traced with ``to_onnx`` and run by onnxruntime on the example's test images, good and
defect: scores within 1e-4 of torch (relative to the score, or to the threshold where the score is
near zero: DMAD's scores are logits), maps within 1e-3 after dividing by the threshold, identical
verdicts, and a batch size other than the traced one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install defectscope[onnx])")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install defectscope[onnx])")

from defectscope.data import ImageDataset, iterate_batches, mvtec_samples  # noqa: E402
from defectscope.errors import NotExportable  # noqa: E402
from defectscope.export.graph import to_onnx  # noqa: E402
from defectscope.methods import METHODS, Detector  # noqa: E402
from defectscope.nn.exact_knn import knn  # noqa: E402
from defectscope.nn.knn import NearestNeighbors  # noqa: E402
from helpers import DMAD_TINY  # noqa: E402

DIFFUSION = {"image_size": 32, "unet": "tiny", "epochs": 1, "steps": 2, "batch_size": 4}
TINY: dict[str, dict[str, Any]] = {
    "spade": {"image_size": 64, "num_image_neighbors": 3},
    "fyd": {"image_size": 64, "epochs": 1, "fine_epochs": 1, "batch_size": 8, "proj_dim": 16},
    "students": {"image_size": 64, "epochs": 1, "batch_size": 8, "n_students": 2, "width": 16},
    "mkd": {"image_size": 64, "epochs": 1, "batch_size": 8, "width": 16},
    "reverse_distillation": {"image_size": 64, "epochs": 1, "batch_size": 8, "embed_dim": 32},
    "draem": {"image_size": 64, "epochs": 3, "batch_size": 8, "base_channels": 4, "disc_channels": 4},
    "dmad": DMAD_TINY,
    "ddad": DIFFUSION | {"da_epochs": 1, "da_images": 4},
    "glad": DIFFUSION,
}
#: Exported and tested in test_export.py.
ELSEWHERE = ("patchcore", "padim")
SCORE_RTOL, MAP_ATOL = 1e-4, 1e-3


def test_every_method_exports_or_is_tested_elsewhere() -> None:
    exportable = {name for name, cls in METHODS.items() if cls.export_unsupported is None}
    assert exportable == set(TINY) | set(ELSEWHERE)


@pytest.fixture(scope="module")
def train(example_root: Path) -> list:
    return mvtec_samples(example_root, "train")[:8]


@pytest.fixture(scope="module")
def fitted(train: list) -> Callable[[str], Detector]:
    cache: dict[str, Detector] = {}

    def get(name: str) -> Detector:
        if name not in cache:
            if name in ("ddad", "glad"):
                pytest.importorskip(
                    "diffusers", reason="diffusers is not installed (pip install defectscope[diffusion])"
                )
            cache[name] = METHODS[name](**TINY[name]).fit(train)
        return cache[name]

    return get


def _images(root: Path, size: int) -> torch.Tensor:
    """All test images of the example (good and three defect types) at ``size``."""
    samples = mvtec_samples(root, "test")
    assert {s.label for s in samples} == {0, 1}
    return next(iterate_batches(ImageDataset(samples, size), len(samples)))["image"]


def _session(model: Any) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(TINY))
def test_onnx_graph_agrees_with_torch(name: str, fitted: Callable[[str], Detector], example_root: Path) -> None:
    det = fitted(name)
    images = _images(example_root, det.image_size)
    ours = det.predict(images)
    session = _session(to_onnx(det))
    assert [o.name for o in session.get_outputs()][:2] == ["scores", "maps"]
    scores, maps = (torch.from_numpy(a) for a in session.run(["scores", "maps"], {"images": images.numpy()}))
    assert scores.shape == ours.scores.shape and maps.shape == ours.maps.shape
    threshold = ours.threshold
    assert threshold is not None and threshold != 0
    scale = ours.scores.abs().clamp_min(abs(threshold))
    assert ((scores - ours.scores).abs() / scale).max() <= SCORE_RTOL
    assert (maps - ours.maps).abs().max() / abs(threshold) <= MAP_ATOL
    # the same verdicts, except where a score lies within the score tolerance of the threshold
    decided = (ours.scores - threshold).abs() > SCORE_RTOL * scale
    assert torch.equal((scores > threshold)[decided], (ours.scores > threshold)[decided])
    assert ours.scores.std() > 0  # a fitted model, not a constant one
    (single,) = session.run(["scores"], {"images": images[:1].numpy()})
    np.testing.assert_allclose(single, scores[:1].numpy(), rtol=1e-5, atol=1e-6 * abs(threshold))


def test_gradient_maps_of_mkd_are_not_exportable(fitted: Callable[[str], Detector]) -> None:
    det = fitted("mkd")
    det.localization = "gradient"
    try:
        with pytest.raises(NotExportable) as info:
            to_onnx(det)
    finally:
        det.localization = "discrepancy"
    message = str(info.value)
    assert message.startswith("mkd cannot be exported to ONNX: localization='gradient'") and "\n" not in message


def test_tensor_knn_gives_the_exact_faiss_neighbours() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(700, 24, generator=generator) * 3 + 5
    queries = torch.randn(90, 24, generator=generator) * 3 + 5
    expected = NearestNeighbors(bank, exact=True).search(queries, 4)
    for chunk in (64, 4096):  # several partial top-k merged, and one
        found = knn(queries, bank, 4, chunk=chunk)
        assert torch.equal(found.indices, expected.indices)
        torch.testing.assert_close(found.distances, expected.distances, rtol=1e-5, atol=1e-5)
    assert knn(queries, bank[:3], 4).indices.shape == (90, 3)  # k capped at the bank's size
