"""ONNX export and the onnxruntime / OpenVINO engines: parity with torch, metadata, safety, the CLI.

A small PatchCore and PaDiM are fitted on the bundled example; their graphs run in onnxruntime (and
OpenVINO when installed) on the example's test images, good and defect, and must agree with torch:
scores within 1e-4 relative, maps within 1e-3 of the threshold, identical verdicts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install defectscope[onnx])")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install defectscope[onnx])")

from defectscope.cli import main  # noqa: E402
from defectscope.data import iterate_batches  # noqa: E402
from defectscope.data.sources import labelled_samples  # noqa: E402
from defectscope.engines import EngineChoice, use_engine  # noqa: E402
from defectscope.errors import DefectscopeError, ExportedModelError  # noqa: E402
from defectscope.export.build import export_detector  # noqa: E402
from defectscope.export.onnx_file import read_exported, with_metadata, write_exported  # noqa: E402
from defectscope.export.parity import compare  # noqa: E402
from defectscope.methods import load  # noqa: E402
from defectscope.methods.model_file import read_config  # noqa: E402
from defectscope.nn.knn import BankSearch, NearestNeighbors  # noqa: E402
from defectscope.runs import calibrate_run, evaluate_run, fit_run, predict_run  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bottle_small"
SMALL = {"backbone": "mobilenet_v2", "image_size": 64}
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PatchCore and PaDiM fitted on the bundled example, as run folders."""
    out = {}
    for method, extra in (("patchcore", {"num_neighbors": 3}), ("padim", {})):
        folder = tmp_path_factory.mktemp(method) / "run"
        fit_run(EXAMPLE, folder, method=method, params={**SMALL, **extra})
        out[method] = folder
    return out


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    """The example's test images (good and defect) at 64 px."""
    samples = labelled_samples(EXAMPLE)
    from defectscope.data import ImageDataset

    return torch.cat([b["image"] for b in iterate_batches(ImageDataset(samples, 64), 32)])


def _engine(run: Path, name: str, whole_graph: bool = True, int8: bool = False):  # type: ignore[no-untyped-def]
    detector = load(run)
    use_engine(detector, EngineChoice(name, whole_graph=whole_graph, int8=int8), run)
    engine = detector.engine
    detector.engine = None
    return detector, engine


@pytest.mark.parametrize("method", ["patchcore", "padim"])
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engines_agree_with_torch(runs: dict[str, Path], test_images: torch.Tensor, method: str, engine: str) -> None:
    if engine == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install defectscope[openvino])")
    detector, graph = _engine(runs[method], engine)
    parity = compare(detector, graph, test_images)
    assert parity.n_images == len(test_images) >= 15
    assert parity.within_bounds, parity.describe()
    scores = detector.predict(test_images).scores
    assert scores.std() > 0  # real, varied scores: good and defect images differ


def test_patchcore_handover_to_faiss_agrees_with_the_whole_graph(
    runs: dict[str, Path], test_images: torch.Tensor
) -> None:
    _, whole = _engine(runs["patchcore"], "onnxruntime", whole_graph=True)
    _, split = _engine(runs["patchcore"], "onnxruntime", whole_graph=False)
    assert split.handover == "embeddings" and whole.handover is None
    a, b = whole.run(test_images), split.run(test_images)
    assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=0)
    assert (a.maps - b.maps).abs().max() <= 1e-4 * a.maps.abs().max()


def test_bank_search_replicates_faiss_flat_and_inverted_file() -> None:
    """The graph's search returns faiss's answer: exact for a flat index, the same cells probed for IVF."""
    gen = torch.Generator().manual_seed(0)
    for n in (500, 10_000):  # flat, then an inverted file (over IVF_MIN_BANK)
        centres = torch.randn(40, 24, generator=gen) * 3
        bank = centres[torch.randint(0, 40, (n,), generator=gen)] + torch.randn(n, 24, generator=gen)
        queries = torch.cat([bank[:200] + 0.01 * torch.randn(200, 24, generator=gen), torch.randn(300, 24) * 4])
        index = NearestNeighbors(bank)
        assert (index.nprobe is None) == (n == 500)
        want = index.search(queries, 1)
        dist, rows = BankSearch(index)(queries)
        assert (rows == want.indices[:, 0]).float().mean() >= 0.999  # ties aside
        same = rows == want.indices[:, 0]
        assert torch.allclose(dist[same], want.distances[same, 0], rtol=1e-5, atol=1e-5)
        if index.nprobe is not None:  # it really searched only the probed cells: exact search finds closer rows
            exact = NearestNeighbors(bank, exact=True).search(queries, 1)
            assert (exact.distances[:, 0] < dist - 1e-4).any()


def test_export_cli_writes_metadata_not_constants(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    run = runs["patchcore"]
    assert main(["export", str(run)]) == 0
    err = capsys.readouterr().err
    assert "verdicts identical" in err and "model.onnx" in err
    exported = read_exported(run / "model.onnx")
    meta, config = exported.meta, read_config(run)
    assert meta["method"] == "patchcore" and meta["threshold"] == pytest.approx(config["calibration"]["threshold"])
    assert meta["source_tensors_sha256"] == config["tensors_sha256"] and meta["geometry"]["resize"] == "square"
    assert meta["params"]["image_size"] == 64 and meta["defectscope_version"]
    inputs = exported.model.graph.input
    assert inputs[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    # a second export replaces the first (ours); a file that is not ours is refused without --overwrite
    assert main(["export", str(run), "--no-check"]) == 0
    foreign = run / "mine.onnx"
    foreign.write_bytes(b"not mine to replace")
    assert main(["export", str(run), "--out", str(foreign), "--no-check"]) == 2
    assert "is not a defectscope export" in capsys.readouterr().err
    assert foreign.read_bytes() == b"not mine to replace"


def test_recalibrating_keeps_the_export_valid(runs: dict[str, Path], tmp_path: Path) -> None:
    """The threshold is metadata: a run calibrated again uses its new threshold with the same graph file."""
    run = tmp_path / "run"
    shutil.copytree(runs["padim"], run)
    main(["export", str(run), "--no-check"])
    graph_before = (run / "model.onnx").read_bytes()
    calibrate_run(run, [EXAMPLE / "test" / "good"], false_alarm_rate=0.2)
    new_threshold = read_config(run)["calibration"]["threshold"]
    result = predict_run(run, [EXAMPLE / "test" / "broken_large"], engine=EngineChoice("onnxruntime"))
    assert {r.threshold for r in result.records} == {new_threshold}
    assert {r.engine for r in result.records} == {"onnxruntime"}
    assert (run / "model.onnx").read_bytes() == graph_before


def test_records_and_report_name_the_engine(runs: dict[str, Path], tmp_path: Path) -> None:
    torch_result = evaluate_run(runs["patchcore"], EXAMPLE, out=tmp_path / "torch", overlays=False)
    ort_result = evaluate_run(
        runs["patchcore"], EXAMPLE, out=tmp_path / "ort", overlays=False, engine=EngineChoice("onnxruntime")
    )
    assert {r.engine for r in torch_result.records} == {"torch"}
    assert {r.engine for r in ort_result.records} == {"onnxruntime"}
    for a, b in zip(torch_result.records, ort_result.records):
        assert a.path == b.path and a.verdict == b.verdict
        assert b.score == pytest.approx(a.score, rel=1e-4)
    metrics = json.loads((tmp_path / "ort" / "metrics.json").read_text())
    assert metrics["model"]["engine"]["engine"] == "onnxruntime"
    assert "engine" in (tmp_path / "ort" / "predictions.csv").read_text().splitlines()[0]
    report = (tmp_path / "ort" / "report.html").read_text()
    assert '<tr data-fact="engine"><th class="row">engine</th><td>onnxruntime (' in report
    for key in ("image_auroc", "pixel_auroc"):
        assert ort_result.parts[0].metrics[key] == pytest.approx(torch_result.parts[0].metrics[key], abs=1e-6)


def test_int8_export_runs_and_stays_close(runs: dict[str, Path], test_images: torch.Tensor) -> None:
    run = runs["patchcore"]
    detector, graph = _engine(run, "onnxruntime", int8=True)
    exported = graph.exported
    assert exported.meta["int8"] is True
    assert any(n.op_type == "QLinearConv" for n in exported.model.graph.node)  # int8 kernels, not fake quantisation
    parity = compare(detector, graph, test_images)
    assert 0 < parity.score_rel < 0.2  # int8 moves scores a little, not to noise (accuracy: BENCHMARKS.md)
    assert main(["predict", str(run), str(EXAMPLE / "test" / "good"), "--engine", "onnxruntime", "--int8"]) == 0


def _damaged_copies(source: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files a user might hand us instead of a good export, with the message each must get."""
    data = source.read_bytes()
    model = onnx.load(source)
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, content: bytes, message: str) -> None:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        cases[name] = (path, message)

    put("empty", b"", "file is empty")
    put("garbage", b"\x89PNG\r\n\x1a\n not a graph at all", "not an ONNX model")
    put("truncated", data[: len(data) // 2], "not an ONNX model")
    foreign = onnx.load(source)
    del foreign.metadata_props[:]
    put("foreign", foreign.SerializeToString(), "not exported by defectscope")
    edited = onnx.load(source)
    weights = max(edited.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weights.raw_data)
    raw[len(raw) // 2] ^= 0xFF
    weights.raw_data = bytes(raw)
    put("edited", edited.SerializeToString(), "damaged or was modified")
    custom = onnx.load(source)
    custom.graph.node[0].domain = "com.example.evil"
    custom.opset_import.add(domain="com.example.evil", version=1)
    meta = {p.key.removeprefix("defectscope."): json.loads(p.value) for p in custom.metadata_props}
    put(
        "custom",
        with_metadata(custom, {k: v for k, v in meta.items() if k != "graph_sha256"}).SerializeToString(),
        "custom operators",
    )
    external = onnx.load(source)
    external.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    meta = {p.key.removeprefix("defectscope."): json.loads(p.value) for p in model.metadata_props}
    put(
        "external",
        with_metadata(external, {k: v for k, v in meta.items() if k != "graph_sha256"}).SerializeToString(),
        "external data",
    )
    return cases


def test_damaged_foreign_and_unsafe_files_get_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = runs["padim"]
    main(["export", str(run), "--no-check"])
    capsys.readouterr()
    for name, (path, message) in _damaged_copies(run / "model.onnx", tmp_path).items():
        with pytest.raises(ExportedModelError) as caught:
            read_exported(path)
        text = str(caught.value)
        assert message in text and str(path) in text and "\n" not in text, (name, text)
        code = main(
            ["predict", str(run), str(EXAMPLE / "test" / "good"), "--engine", "onnxruntime", "--exported", str(path)]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (name, err)


def test_an_export_of_another_model_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """A model.onnx copied from another run (or left from before a re-fit) is not used for this run."""
    main(["export", str(runs["patchcore"]), "--no-check"])
    other = tmp_path / "other"
    fit_run(EXAMPLE, other, method="patchcore", params={**SMALL, "num_neighbors": 3, "coreset_ratio": 0.5})
    shutil.copy(runs["patchcore"] / "model.onnx", other / "model.onnx")
    with pytest.raises(ExportedModelError, match="exported from another model"):
        predict_run(other, [EXAMPLE / "test" / "good"], engine=EngineChoice("onnxruntime"))
    with pytest.raises(ExportedModelError, match="from a patchcore model"):
        predict_run(
            runs["padim"],
            [EXAMPLE / "test" / "good"],
            engine=EngineChoice("onnxruntime", exported=str(other / "model.onnx")),
        )


def test_engine_options_are_checked(runs: dict[str, Path]) -> None:
    with pytest.raises(DefectscopeError, match="need --engine onnxruntime or openvino"):
        EngineChoice("torch", int8=True)
    with pytest.raises(DefectscopeError, match="engine 'tensorrt'"):
        EngineChoice("tensorrt")
    exported = export_detector(load(runs["padim"]), read_config(runs["padim"])["tensors_sha256"])
    path = write_exported(exported.model, runs["padim"] / "fp32-copy.onnx")
    with pytest.raises(DefectscopeError, match="a float32 export; leave out --int8"):
        predict_run(
            runs["padim"],
            [EXAMPLE / "test" / "good"],
            engine=EngineChoice("onnxruntime", int8=True, exported=str(path)),
        )


def test_scores_of_engines_on_geometry_views(runs: dict[str, Path], tmp_path: Path) -> None:
    """Engines replace only the computation on views: a tiled model scores the same through onnxruntime."""
    run = tmp_path / "tiles"
    from defectscope.geometry import Geometry

    fit_run(EXAMPLE, run, method="padim", params={**SMALL}, geometry=Geometry(tile=64, scale=0.25))
    a = predict_run(run, [EXAMPLE / "test" / "broken_large"])
    b = predict_run(run, [EXAMPLE / "test" / "broken_large"], engine=EngineChoice("onnxruntime"))
    assert [r.verdict for r in a.records] == [r.verdict for r in b.records]
    assert np.allclose([r.score for r in a.records], [r.score for r in b.records], rtol=1e-4, atol=0)
