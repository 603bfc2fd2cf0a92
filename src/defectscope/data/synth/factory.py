"""Building a synthesiser from its kind name (what the CLI and configs use)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ...errors import DefectscopeError
from .base import Sometimes, Synthesizer
from .croppaste import CropPaste
from .cutpaste import CutPaste
from .textures import PerlinTexture

KINDS = ("perlin", "cutpaste", "scar", "croppaste")


def make_synthesizer(
    kind: str,
    *,
    texture_dir: str | os.PathLike[str] | None = None,
    textures: Sequence[torch.Tensor] | None = None,
    defects: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    probability: float = 1.0,
) -> Synthesizer:
    """The synthesiser of ``kind``: perlin (with optional textures), cutpaste, scar or croppaste (needs defects).

    ``probability`` is the chance of an anomaly at all (else the image comes back unchanged with
    an empty mask). Textures belong to perlin and defects to croppaste only; giving them to
    another kind is an error.
    """
    if kind not in KINDS:
        raise DefectscopeError(f"unknown anomaly kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind != "perlin" and (texture_dir is not None or textures is not None):
        raise DefectscopeError(f"textures are used by the perlin kind only, not {kind}")
    if kind != "croppaste" and defects is not None:
        raise DefectscopeError(f"defects are used by the croppaste kind only, not {kind}")
    if kind == "perlin":
        return PerlinTexture(textures=textures, texture_dir=texture_dir, probability=probability)
    if kind == "croppaste":
        if not defects:
            raise DefectscopeError("croppaste needs labelled defects: give (image, mask) pairs (CLI: --defects)")
        synthesizer: Synthesizer = CropPaste(defects)
    else:
        synthesizer = CutPaste("patch" if kind == "cutpaste" else "scar")
    return synthesizer if probability == 1.0 else Sometimes(synthesizer, probability)
