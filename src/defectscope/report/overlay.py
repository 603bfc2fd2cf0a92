"""The heat map's colours and scale, and distinct file names for the images of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Colour ramp from dark blue through cyan, yellow to red (a perceptually ordered "jet"-like ramp).
RAMP = np.array(
    [[0, 0, 128], [0, 64, 255], [0, 200, 255], [80, 255, 160], [255, 230, 0], [255, 90, 0], [180, 0, 0]],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    pos = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    low = np.floor(pos).astype(int).clip(0, len(RAMP) - 2)
    frac = (pos - low)[..., None]
    return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).astype(np.uint8)


def display_max(threshold: float | None, amap: np.ndarray) -> float:
    """Top of the colour scale: 1.5 x the decision threshold (so red means anomalous), else the map's maximum."""
    return 1.5 * threshold if threshold else float(amap.max())


def unique_names(paths: list[str]) -> list[str]:
    """A distinct, readable file-name stem for each path (same order).

    The stem of the file name where that is unique; where several paths share it, as many parent
    folders as it takes to tell them apart (``good_000`` / ``broken_000``), and the extension
    last (``000_png`` / ``000_jpg``). Separators become ``_``, so names never leave their folder;
    a path named twice is numbered.
    """

    def candidates(path: str) -> list[str]:
        p = Path(path)
        parents = [part for part in p.parent.parts if part not in ("/", "\\", ".", "..")]
        found = ["_".join([*parents[len(parents) - k :], p.stem]) for k in range(len(parents) + 1)]
        return [*found, "_".join([*parents, p.stem, p.suffix.lstrip(".")])]

    distinct = list(dict.fromkeys(paths))
    options = [candidates(p) for p in distinct]
    level = [0] * len(distinct)
    while True:
        names = [o[k] for o, k in zip(options, level)]
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        clashing = [i for i, n in enumerate(names) if counts[n] > 1 and level[i] < len(options[i]) - 1]
        if not clashing:
            break
        for i in clashing:
            level[i] += 1
    by_path = dict(zip(distinct, names))
    seen: dict[str, int] = {}
    out = []
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        out.append(by_path[path] if seen[path] == 1 else f"{by_path[path]}_{seen[path]}")
    return out
