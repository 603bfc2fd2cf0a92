"""DMAD (Hu et al., "DMAD: Dual Memory Bank for Real-World Anomaly Detection", arXiv 2403.12362).

One model for one or many categories, from good images alone or with a few labelled defects:

* patch features as in PatchCore (locally averaged s8 + s16 backbone maps);
* a **normal bank**: greedy coreset of good-patch features;
* an **anomaly bank**: features of the anomalous patches of synthetic anomalies (Perlin-noise
  textures and CutPaste on the training images; kept grey on grey parts), plus, when labelled
  defects are given, the features of their defect regions, gathered with *anomaly-centred
  sampling* (extra crops centred on the defect, flipped and turned, and the defect pasted onto
  good images) so that a handful of defects still yields enough anomalous patches;
* for every patch, the **enhanced representation**: the feature, its distances to its k nearest
  entries of each bank and, per bank, the feature minus a cross-attention read-out of those
  neighbours (softmax over their negative squared, scaled distances);
* an **MLP** maps the representation to a patch score (logit), trained with binary
  cross-entropy, normal and anomalous patches balanced in every batch. Anomalous training
  patches: synthetic ones, labelled ones, and pseudo-anomalies by *feature fusion* (normal
  features moved part of the way toward anomalous ones).

Two choices go beyond the paper, both measured on mtd (figures in BENCHMARKS.md): a synthetic anomaly
whose patch is no farther from the normal bank than 90 % of normal patches (its category's
``visible_quantile``) is not used (the image changed, its features did not: a wrong label); and
the MLP output is a bounded correction (``correction_bound`` logits) to a score anchored on the
nearest-normal distance, so that defects unlike any (pseudo-)anomaly still score high.

Training patches come from the same images as the banks, so each training patch is matched
leave-one-out: bank entries from its own image (or defect) are skipped, so it sees the banks as
a test image does (:mod:`defectscope.nn.grouped_knn`). Budgets (pooled patches, synthetic
images, bank and training-patch counts) are per category, so a unified model over C categories
gets C times the budget of one and every category is represented as in its own model.

Anomaly map: patch logits upsampled and smoothed (:func:`~defectscope.postprocess.anomaly_maps`);
image score: the map's maximum.

The package: :mod:`.banks` gathers the banks and training patches, :mod:`.scorer` holds the
enhanced representation and the scorer, :mod:`.detector` fits, predicts and saves.
"""

from .detector import DMAD
from .scorer import knowledge

__all__ = ["DMAD", "knowledge"]
