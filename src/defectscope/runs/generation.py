"""``generate fit`` / ``generate sample``: learn a defect generator per category, write image / mask pairs.

The generator folder holds the model files plus, in its ``fit_info["source"]``, the category it
learnt from and the exact defect images of each type, so that sampling knows its good images and
an evaluation can leave the learnt images out. Sampled pairs are written in MVTec layout with a
manifest (``generated.json``) naming the good image, mask source and seed of every pair.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import __version__
from ..data.image_io import image_header_size, load_mask, mask_to_tensor, read_image, resize_uint8
from ..data.layouts import image_files
from ..data.sources import resolve_category, training_samples
from ..devices import check_device
from ..errors import DataError, DefectscopeError, OutputError
from ..generate.defects import DefectExample, defect_examples, first_examples
from ..generate.generator import DefectGenerator, fit_generator
from ..generate.mask_filter import accept_mask
from ..generate.metrics import MANIFEST, MANIFEST_FORMAT
from ..generate.settings import GeneratorSettings
from ..outputs import atomic_save_image, atomic_write, atomic_write_json, prepare_output_dir, require_empty_folder
from ..progress import Log, progress_enabled, quiet

#: Categories treated as textures (adaptive attention on by default): MVTec AD's textures and MTD.
TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood", "magnetic_tile"})
#: How many mask samples may be drawn per accepted mask before ``--new-masks`` gives up.
MASK_ATTEMPTS = 20
#: ... and it gives up at once when none of the first this many passed (a mask model that draws only empty masks).
FIRST_DRAWS = 32
BATCH = 8
#: Largest share of one image side a generated mask may cover (the official sampler's third).
BORDER_SHARE = 1 / 3


def is_texture(category: Path) -> bool:
    """True for texture categories, where the paper turns adaptive attention re-weighting on."""
    return category.name.lower() in TEXTURES


@dataclass
class GenerateFitResult:
    """A fitted generator: where it was saved, what it learnt from."""

    generator: DefectGenerator
    folder: Path
    category: Path
    n_good: int
    defects: dict[str, list[DefectExample]]


def _source_record(category: Path, n_good: int, defects: dict[str, list[DefectExample]], origin: str) -> dict[str, Any]:
    return {
        "category": os.path.abspath(category),
        "good_images": n_good,
        "defects_from": origin,
        "defects": {
            name: [{"image": os.path.abspath(e.image), "mask": os.path.abspath(e.mask)} for e in examples]
            for name, examples in defects.items()
        },
    }


def generate_fit_run(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    settings: GeneratorSettings | None = None,
    category: str | None = None,
    defects_from: str | os.PathLike[str] | None = None,
    labelled_defects: int | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    adaptive_attention: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    log: Log = quiet,
) -> GenerateFitResult:
    """Learn a generator for every defect type of the category ``data`` and save it to ``out``.

    Defects come from ``defects_from`` (an MVTec-layout category: all of its labelled defects, or
    the first ``labelled_defects`` per type) or else from the category's own test split: the
    first ``labelled_defects`` per type (sorted by file name), by default the first third, as in
    the paper's protocol. ``adaptive_attention`` (eq. 7 at generation) None means on for
    textures (:data:`TEXTURES`) and off for objects, as the paper recommends. Training runs on
    ``device``; the generator saved is the same whatever the device.
    """
    device = check_device(device)
    source = resolve_category(data, category)
    good = [s.path for s in training_samples(source)]
    if defects_from is not None:
        found = defect_examples(defects_from)
        defects = found if labelled_defects is None else first_examples(found, labelled_defects)
        origin = f"{os.path.abspath(defects_from)} ({'all' if labelled_defects is None else labelled_defects} per type)"
    else:
        defects = first_examples(defect_examples(source), labelled_defects)
        share = "the first third" if labelled_defects is None else f"the first {labelled_defects}"
        origin = f"{share} of each type of {os.path.abspath(source)}/test (sorted by file name)"
    attention = is_texture(source) if adaptive_attention is None else adaptive_attention
    settings = dataclasses.replace(settings or GeneratorSettings(), adaptive_attention=attention, category=source.name)
    folder = Path(out)
    if (folder / "config.json").is_file() and not (overwrite or resume):
        raise OutputError(f"{folder}: already holds a generator; pass --overwrite to replace it (or another --out)")
    prepare_output_dir(folder, overwrite=overwrite, what="generator", allow=lambda f: (f / "config.json").is_file())
    counts = ", ".join(f"{name} {len(examples)}" for name, examples in defects.items())
    log(f"learning defects of {source.name} from {origin}: {counts}; {len(good)} good images")
    generator = fit_generator(
        good,
        defects,
        settings,
        pretrained=None if pretrained is None else Path(pretrained),
        checkpoint_dir=folder / "checkpoint",
        resume=resume,
        log=log,
        device=device,
    )
    generator.fit_info["source"] = _source_record(source, len(good), defects, origin)
    generator.save(folder)
    return GenerateFitResult(generator, folder, source, len(good), defects)


@dataclass
class GenerateSampleResult:
    """What ``generate_sample_run`` wrote."""

    folder: Path
    counts: dict[str, int]
    manifest: Path
    readme: Path
    masks_rejected: dict[str, dict[str, int]]


def _good_images(generator: DefectGenerator, good: str | os.PathLike[str] | None) -> list[Path]:
    """The good images to generate onto: ``good`` (a category or folder), else the learnt category's."""
    if good is None:
        source = generator.fit_info.get("source", {}).get("category")
        if not source:
            raise DefectscopeError("this generator does not record its category; pass --good DIR")
        if not Path(source).is_dir():
            raise DataError(f"{source}: the generator's category is gone; pass --good DIR")
        good = source
    return [s.path for s in training_samples(good)]


def _given_masks(masks: str | os.PathLike[str], types: Sequence[str]) -> dict[str, list[Path]]:
    """Mask files per type: ``masks/ground_truth/<type>/`` (an MVTec category) or ``masks/<type>/``."""
    root = Path(masks).expanduser()
    base = root / "ground_truth" if (root / "ground_truth").is_dir() else root
    found = {}
    for name in types:
        if not (base / name).is_dir():
            raise DataError(f"{base / name}: no mask folder for defect type {name!r} (expected {base}/<type>/)")
        found[name] = image_files([base / name])
    return found


def _read_mask(path: Path, size: int) -> np.ndarray:
    mask = mask_to_tensor(load_mask(path, image_header_size(path)), size).numpy()
    if not mask.any():
        raise DataError(f"{path}: mask is empty at {size} px, so it marks no defect region")
    return mask


def _read_good(path: Path, size: int) -> np.ndarray:
    img, _ = read_image(path, draft_to=size)
    return resize_uint8(img, size).permute(1, 2, 0).numpy()


def border_rule(generator: DefectGenerator, name: str, size: int) -> float | None:
    """The mask filter's border share for type ``name``: off when a learnt mask of it runs along an edge.

    Cracks and frays on tiles cross the image edge; refusing such masks would refuse the type itself.
    """
    learnt = generator.fit_info.get("source", {}).get("defects", {}).get(name, [])
    for example in learnt:
        path = Path(example["mask"])
        if not path.is_file():
            continue
        mask = mask_to_tensor(load_mask(path, image_header_size(path)), size).numpy()
        if max(float(side.mean()) for side in (mask[0], mask[-1], mask[:, 0], mask[:, -1])) > BORDER_SHARE:
            return None
    return BORDER_SHARE


def _new_masks(
    generator: DefectGenerator, name: str, count: int, seed: int, size: int, rejected: dict[str, int]
) -> Iterator[np.ndarray]:
    """``count`` accepted masks of type ``name`` from the mask model, at ``size``."""
    accepted, drawn, round_ = 0, 0, 0
    border = border_rule(generator, name, size)
    while accepted < count:
        if drawn >= MASK_ATTEMPTS * count or (drawn >= FIRST_DRAWS and not accepted):
            reasons = ", ".join(f"{why}: {n}" for why, n in sorted(rejected.items())) or "none"
            raise DefectscopeError(
                f"{name}: only {accepted} of {drawn} generated masks passed the filter (rejected: {reasons}); "
                "train the generator longer or pass --masks DIR"
            )
        want = min(BATCH, count - accepted)
        draw_seed = int(np.random.default_rng([seed, round_]).integers(2**31))
        for prob in generator.generate_masks(name, want, seed=draw_seed, size=size):
            drawn += 1
            mask, reason = accept_mask(prob, max_border_share=border)
            if mask is None:
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            accepted += 1
            yield mask
        round_ += 1


def generate_sample_run(
    generator_dir: str | os.PathLike[str],
    count: int,
    out: str | os.PathLike[str],
    *,
    good: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    types: Sequence[str] | None = None,
    image_size: int = 256,
    seed: int = 0,
    adaptive_attention: bool | None = None,
    command_line: str = "",
    device: str | torch.device = "cpu",
    log: Log = quiet,
) -> GenerateSampleResult:
    """Write ``count`` generated defect images per type, each with its exact mask, in MVTec layout.

    Good images (``good``, default the learnt category's ``train/good``) are used round-robin;
    masks come from ``masks`` (used round-robin per type) or, by default, from the generator's
    mask model (thresholded and filtered). Pixels outside a mask equal the resized good image;
    that is checked for every pair before it is written. The generator runs on ``device``.
    """
    if count < 1:
        raise DefectscopeError(f"--count must be at least 1, got {count}")
    if image_size < 8:
        raise DefectscopeError(f"--image-size must be at least 8 pixels, got {image_size}")
    generator = DefectGenerator.load(Path(generator_dir), device=device)
    names = list(types) if types else list(generator.defect_types)
    unknown = [n for n in names if n not in generator.defect_types]
    if unknown:
        raise DefectscopeError(
            f"unknown defect type {unknown[0]!r} (this generator knows: {', '.join(generator.defect_types)})"
        )
    goods = _good_images(generator, good)
    given = _given_masks(masks, names) if masks is not None else None
    root = Path(out).expanduser()
    for name in names:
        require_empty_folder(root / "test" / name)
        require_empty_folder(root / "ground_truth" / name)
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        raise OutputError(f"{manifest_path}: already exists; choose another --out (generated pairs are never mixed)")
    pairs: list[dict[str, Any]] = []
    rejected: dict[str, dict[str, int]] = {}
    digits = max(3, len(str(count - 1)))
    bar = tqdm(total=count * len(names), desc="generate", unit="img", disable=not progress_enabled())
    for type_index, name in enumerate(names):
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
        rejected[name] = {}
        if given is not None:
            files = given[name]
            mask_iter: Iterator[np.ndarray] = (_read_mask(files[i % len(files)], image_size) for i in range(count))
        else:
            mask_iter = _new_masks(generator, name, count, seed + 7919 * type_index, image_size, rejected[name])
        for start in range(0, count, BATCH):
            index = list(range(start, min(count, start + BATCH)))
            sources = [goods[(i + type_index) % len(goods)] for i in index]
            images = [_read_good(p, image_size) for p in sources]
            batch_masks = [next(mask_iter) for _ in index]
            seeds = [int(np.random.default_rng([seed, type_index, i]).integers(2**31)) for i in index]
            outputs = generator.generate(
                images, batch_masks, [name] * len(index), seeds, adaptive_attention=adaptive_attention
            )
            for i, source, before, after, mask, pair_seed in zip(index, sources, images, outputs, batch_masks, seeds):
                outside = ((before != after).any(axis=-1) & ~mask).sum()
                if outside:
                    raise DefectscopeError(
                        f"internal error: generated image {i} of {name} changed {outside} pixels outside its mask"
                    )
                image_rel, mask_rel = f"test/{name}/{i:0{digits}d}.png", f"ground_truth/{name}/{i:0{digits}d}_mask.png"
                atomic_save_image(root / image_rel, Image.fromarray(after))
                atomic_save_image(root / mask_rel, Image.fromarray(mask.astype(np.uint8) * 255))
                pairs.append(
                    {
                        "image": image_rel,
                        "mask": mask_rel,
                        "good": os.path.abspath(source),
                        "defect_type": name,
                        "seed": pair_seed,
                        "mask_source": "given" if given is not None else "generated",
                        "mask_pixels": int(mask.sum()),
                        "changed_pixels": int((before != after).any(axis=-1).sum()),
                    }
                )
            bar.update(len(index))
            _write_manifest(manifest_path, generator_dir, image_size, pairs, complete=False)
    bar.close()
    _write_manifest(manifest_path, generator_dir, image_size, pairs, complete=True)
    readme = _append_readme(
        root, generator, generator_dir, names, count, image_size, seed, given is not None, masks, command_line
    )
    counts = {name: count for name in names}
    for name, why in rejected.items():
        if why:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(why.items()))
            log(f"{name}: rejected {sum(why.values())} generated masks ({reasons})")
    return GenerateSampleResult(root, counts, manifest_path, readme, rejected)


def _write_manifest(
    path: Path, generator_dir: str | os.PathLike[str], size: int, pairs: list[dict[str, Any]], complete: bool
) -> None:
    atomic_write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "generator": os.path.abspath(generator_dir),
            "image_size": size,
            "complete": complete,
            "pairs": pairs,
        },
    )


def _append_readme(
    root: Path,
    generator: DefectGenerator,
    generator_dir: str | os.PathLike[str],
    names: Sequence[str],
    count: int,
    size: int,
    seed: int,
    given: bool,
    masks: str | os.PathLike[str] | None,
    command_line: str,
) -> Path:
    source = generator.fit_info.get("source", {})
    mask_line = (
        f"from {os.path.abspath(masks)}"
        if given and masks is not None
        else "sampled from the generator's mask model, thresholded and filtered"
    )
    lines = [
        f"## generated defects: {count} per type of {', '.join(names)} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        f"written by defectscope {__version__}" + (f": {command_line}" if command_line else ""),
        f"generator: {os.path.abspath(generator_dir)} (AnomalyDiffusion)",
        f"defects learnt from: {source.get('defects_from', 'unknown')}",
        f"image size: {size} px, seed: {seed}; good images used round-robin (each pair's source in {MANIFEST})",
        f"masks: {mask_line}",
        "images: test/<type>/NNN.png; masks: ground_truth/<type>/NNN_mask.png (255 = generated region; "
        "every pixel outside it equals the resized good image)",
    ]
    readme = root / "README.txt"
    previous = readme.read_text() + "\n" if readme.is_file() else ""
    atomic_write(readme, previous + "\n".join(lines) + "\n")
    return readme
