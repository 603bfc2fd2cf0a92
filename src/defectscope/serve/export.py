"""Operator feedback written out in MVTec layout, so that the next fit or calibration learns from it.

One category folder per served model (the folder is named after the model), holding what the
operator said about its inspections; ``<id>`` is the inspection id and the image is the stored
input byte for byte (with its own extension):

```
OUT/<model>/test/<defect_type>/<id>.png                  confirmed / missed defects with a mask
OUT/<model>/ground_truth/<defect_type>/<id>_mask.png     their masks at the image's size, 0 / 255
OUT/<model>/defects_without_masks/<defect_type>/<id>.png defects without a mask (or an empty one)
OUT/<model>/good/<id>.png                                false alarms and confirmed good parts
```

``test/`` + ``ground_truth/`` make a labelled MVTec category, so
``defectscope fit DATA --labelled-defects K --defects-from OUT/<model>`` (or ``OUT`` itself when it
holds one model, or when its folder is named like the training category) takes its defects from
it; ``defectscope calibrate RUN --good OUT/<model>/good --defects OUT/<model>/test/<type> ...``
re-sets the threshold with the false alarms. The defect type is the operator's, else
``feedback``. Only each inspection's latest feedback counts (it supersedes earlier ones), and an
inspection exported again into the same folder moves to where its latest feedback puts it.

Feedback is marked exported only after its files are written; ``everything`` exports all
feedback again. The output folder follows :func:`~defectscope.outputs.prepare_output_dir`: a
folder of the user's own is never written into without ``overwrite``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.image_io import max_image_pixels, read_image
from ..errors import DataError, DefectscopeError, OutputError
from ..outputs import atomic_save_image, atomic_write, make_folder, prepare_output_dir
from .store import DEFECT_KINDS, Feedback, Inspection, InspectionLog

#: The defect type of defect feedback that names none.
DEFAULT_DEFECT_TYPE = "feedback"
#: The sub-folders of a category that the export writes.
FOLDERS = ("test", "ground_truth", "defects_without_masks", "good")


@dataclass(frozen=True)
class ExportSummary:
    """What one model's export wrote."""

    model: str
    folder: Path
    defects: int  # with masks: test/ + ground_truth/
    defects_without_masks: int
    good: int
    marked: int  # feedback rows marked exported
    skipped: int  # inspections left out (their feedback stays waiting)
    notes: tuple[str, ...]  # one line each: what was left out or exported without its mask, and why

    def describe(self) -> str:
        skipped = f"; {self.skipped} left out, see the notes" if self.skipped else ""
        return (
            f"{self.model}: {self.defects} defect(s) with masks, {self.defects_without_masks} without, "
            f"{self.good} good -> {self.folder} ({self.marked} feedback marked exported{skipped})"
        )


def _check_folder_name(model: str) -> None:
    if (
        model in ("", ".", "..")
        or model.startswith(".")
        or any(c in model for c in "/\\\x00")
        or not model.isprintable()
    ):
        raise OutputError(f"{model!r}: this model name cannot be a folder of the export (rename the served model)")


def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """The operator's mask as 0 / 255 at ``size`` (W, H): white = defect, transparent = background.

    None for an empty mask (nothing drawn), so the defect is exported as one without a mask.
    """
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_image_pixels():
                raise DataError(f"{path}: mask is {img.width}x{img.height} pixels, over the image pixel limit")
            img.load()
            if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                flat.alpha_composite(rgba)
                grey = flat.convert("L")
            else:
                grey = img.convert("L")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: the stored mask cannot be read ({' '.join(str(exc).split())})") from None
    values = np.asarray(grey.resize(size, Image.Resampling.NEAREST)) >= 128
    return (values.astype(np.uint8) * 255) if values.any() else None


def _earlier_files(category: Path) -> dict[str, list[Path]]:
    """Files of an earlier export into ``category``, by inspection id (to move them on re-export)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for sub in FOLDERS:
        top = category / sub
        folders = [top] if sub == "good" else ([p for p in top.iterdir() if p.is_dir()] if top.is_dir() else [])
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.is_file() and not path.name.startswith("."):
                    found[path.stem.removesuffix("_mask")].append(path)
    return found


class _ModelExport:
    """Writes one model's category folder and counts what went where."""

    def __init__(self, log: InspectionLog, model: str, category: Path) -> None:
        self.log, self.model, self.category = log, model, category
        self.earlier = _earlier_files(category)
        self.counts = {"defects": 0, "defects_without_masks": 0, "good": 0}
        self.notes: list[str] = []
        self.skipped = 0

    def _folder(self, *parts: str) -> Path:
        return make_folder(self.category.joinpath(*parts), "the feedback export")

    def add(self, inspection: Inspection, feedback: Feedback) -> bool:
        """Write one inspection where its feedback puts it; False (and a note) when it cannot be."""
        source = self.log.file_path(inspection.image)
        if not source.is_file():
            self.notes.append(f"{inspection.id}: its stored image {inspection.image} is gone; left out")
            self.skipped += 1
            return False
        try:
            _, size = read_image(source)
            mask = None
            if feedback.kind in DEFECT_KINDS and feedback.mask is not None:
                mask_path = self.log.file_path(feedback.mask)
                if mask_path.is_file():
                    mask = _read_mask(mask_path, size)
                else:
                    self.notes.append(f"{inspection.id}: its mask {feedback.mask} is gone; exported without it")
        except DataError as exc:
            self.notes.append(f"{inspection.id}: {exc}; left out")
            self.skipped += 1
            return False
        for path in self.earlier.pop(inspection.id, []):
            path.unlink(missing_ok=True)
        image_name = f"{inspection.id}{source.suffix.lower()}"
        data = source.read_bytes()
        if feedback.kind not in DEFECT_KINDS:
            atomic_write(self._folder("good") / image_name, data)
            self.counts["good"] += 1
            return True
        defect_type = feedback.defect_type or DEFAULT_DEFECT_TYPE
        if mask is None:
            atomic_write(self._folder("defects_without_masks", defect_type) / image_name, data)
            self.counts["defects_without_masks"] += 1
            return True
        # The mask first: a defect image without its mask would make the folder unusable for fit.
        atomic_save_image(
            self._folder("ground_truth", defect_type) / f"{inspection.id}_mask.png", Image.fromarray(mask, "L")
        )
        atomic_write(self._folder("test", defect_type) / image_name, data)
        self.counts["defects"] += 1
        return True


def export_feedback(
    log: InspectionLog,
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    everything: bool = False,
    overwrite: bool = False,
) -> list[ExportSummary]:
    """Write the feedback not exported yet (``everything``: all of it) under ``out``, one category
    folder per model (only ``model`` when given), and mark it exported; one summary per model."""
    inspections = log.feedback_to_export(model=model, everything=everything)
    by_model: dict[str, list[Inspection]] = defaultdict(list)
    for inspection in inspections:
        by_model[inspection.model].append(inspection)
    for name in by_model:
        _check_folder_name(name)
    root = prepare_output_dir(out, overwrite=overwrite, what="feedback export")
    summaries = []
    for name, rows in by_model.items():
        writer = _ModelExport(log, name, root / name)
        done: list[int] = []
        for inspection in rows:
            latest = inspection.latest_feedback
            if latest is None:
                continue
            if writer.add(inspection, latest):
                done += [f.id for f in inspection.feedback if not f.exported]
        try:
            log.mark_exported(done)
        except DefectscopeError as exc:
            raise DefectscopeError(
                f"{root / name}: files written, but the feedback could not be marked ({exc})"
            ) from None
        summaries.append(
            ExportSummary(
                model=name,
                folder=root / name,
                defects=writer.counts["defects"],
                defects_without_masks=writer.counts["defects_without_masks"],
                good=writer.counts["good"],
                marked=len(done),
                skipped=writer.skipped,
                notes=tuple(writer.notes),
            )
        )
    return summaries
