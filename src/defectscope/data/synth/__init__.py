"""Synthetic anomalies: good image -> (anomalous image, exact mask), seeded and reproducible.

Typical use::

    from defectscope.data import ImageDataset, mvtec_samples
    from defectscope.data.synth import SynthDataset, make_synthesizer

    good = ImageDataset(mvtec_samples("examples/bottle_small", "train"), image_size=256)
    train = SynthDataset(good, make_synthesizer("perlin", probability=0.5), seed=0)
    item = train[0]  # item["synth_image"] (3, H, W), item["synth_mask"] (H, W) float32

Kinds: ``perlin`` (DRAEM texture in a Perlin-noise shape), ``cutpaste`` and ``scar`` (CutPaste),
``croppaste`` (real defect regions from a few labelled images).
"""

from .base import Synthesizer
from .croppaste import CropPaste
from .cutpaste import CutPaste
from .dataset import SynthDataset
from .factory import KINDS, make_synthesizer
from .perlin import perlin_mask, perlin_noise
from .textures import PerlinTexture

__all__ = [
    "KINDS",
    "CropPaste",
    "CutPaste",
    "PerlinTexture",
    "SynthDataset",
    "Synthesizer",
    "make_synthesizer",
    "perlin_mask",
    "perlin_noise",
]
