"""What the knowledge-distillation methods (Uninformed Students, MKD, reverse distillation) share.

A frozen pretrained backbone is the teacher; its features at ``layers`` (strides, finest first)
are computed once for the training images and a trained network learns to reproduce them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ..data import ImageDataset
from ..errors import DefectscopeError
from ..nn.distillation import TeacherTargets, stride_index
from ..training import CachedImages, shuffled_batches
from .backbone_detector import BackboneDetector
from .trained import TrainedDetector


class DistillationDetector(TrainedDetector, BackboneDetector):
    """A trained student of the frozen backbone's features at ``layers``."""

    #: The fewest layers the method works with.
    min_layers: ClassVar[int] = 1

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        levels = [stride_index(layer) for layer in self.layers]
        if len(levels) < self.min_layers or levels != sorted(set(levels)):
            count = "distinct" if self.min_layers == 1 else "two or more distinct"
            raise DefectscopeError(
                f"layers must be {count} strides, finest first, e.g. s4,s8,s16; got {list(self.layers)}"
            )
        #: log2 of the strides of ``layers``, finest first.
        self.levels = levels

    def teacher_targets(self, dataset: ImageDataset) -> TeacherTargets:
        """The training images (decoded once) with the teacher's features as ``target0``, ``target1``, ..."""
        return TeacherTargets.compute(CachedImages(dataset), self.features, self.batch_size)

    def epoch_batches(self, data: TeacherTargets) -> Callable[[int], shuffled_batches]:
        """The seeded batches of every epoch, for :meth:`train`."""
        return lambda epoch: shuffled_batches(data, self.batch_size, seed=self.seed, epoch=epoch)
