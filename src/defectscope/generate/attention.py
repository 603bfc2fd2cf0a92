"""Adaptive attention re-weighting (AnomalyDiffusion, Hu et al. 2024, sec. 3.3, eq. 7).

A small defect mask is often left half empty: the generated content drifts back to the good
surface. At every denoising step the generator therefore measures, inside the mask, how far the
predicted clean image x̂0 still is from the good image, and strengthens the cross-attention of
the anomaly tokens where it is close:

    d = mean_c (x̂0 - y)^2,   f = 1 / d,   w = |M| * f / sum_M f,   w <- clip(w, 1, 1.5) inside M, 1 outside.

``|M| * f / sum_M f`` is the *adaptive-scaling softmax* as the official code computes it: the
exponential of the paper's softmax would put all weight on the single closest pixel, so the
official code normalises ``f`` linearly and scales by the mask area (the mean weight over the mask
is 1 before bounding). The bounds [1, 1.5] are the official code's. Differences from it, on
purpose: the mask is not dilated (generated pixels must stay inside the mask), ``d`` is floored
at :data:`MIN_DISTANCE` instead of special-cased, and the weight multiplies the attention
*probabilities* of the anomaly tokens after the softmax (the official code scales their logits),
so attention to every other token, and anywhere outside the mask, is left exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Bounds of the weight inside the mask (the official code's).
LOW, HIGH = 1.0, 1.5
#: Squared differences below this count as this (1 / d stays finite).
MIN_DISTANCE = 1e-6


def adaptive_weights(
    x0_hat: torch.Tensor, good: torch.Tensor, mask: torch.Tensor, low: float = LOW, high: float = HIGH
) -> torch.Tensor:
    """(B, H, W) weight map of eq. 7 from the predicted clean images, the good images (B, C, H, W) and masks.

    ``mask`` is (B, H, W) or (B, 1, H, W) in {0, 1}; an image with an empty mask gets weight 1 everywhere.
    """
    m = (mask[:, 0] if mask.ndim == 4 else mask).to(x0_hat.dtype)
    f = 1.0 / ((x0_hat - good).pow(2).mean(1).clamp(min=MIN_DISTANCE))
    area = m.sum((1, 2), keepdim=True)
    total = (m * f).sum((1, 2), keepdim=True)
    w = (area * f / total.clamp(min=1e-12)).clamp(low, high)
    return torch.where(m > 0, w, torch.ones_like(w))


def reweight_probabilities(probs: torch.Tensor, weights: torch.Tensor, heads: int, tokens: slice) -> torch.Tensor:
    """Attention probabilities (B * heads, queries, keys) with the ``tokens`` columns multiplied by ``weights``.

    ``weights`` is (B, queries): one weight per image position (heads share it).
    """
    w = weights.repeat_interleave(heads, dim=0)[:, :, None].to(probs.dtype)
    out = probs.clone()
    out[:, :, tokens] = probs[:, :, tokens] * w
    return out


@dataclass
class AttentionWeights:
    """What the re-weighting processors read at each UNet call: the weight map (or None: plain attention)."""

    tokens: slice
    weights: torch.Tensor | None = None  # (B, H, W) at the denoiser's input resolution


class ReweightingProcessor:
    """A diffusers attention processor for cross-attention layers: plain attention, or eq. 7's re-weighting.

    While ``state.weights`` is set, the map is resized (area average) to the layer's resolution and
    multiplies the attention probabilities of ``state.tokens``; otherwise ``plain`` computes the layer.
    """

    def __init__(self, state: AttentionWeights, plain: Callable[..., torch.Tensor]) -> None:
        self.state, self.plain = state, plain

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        weights = self.state.weights
        if weights is None or encoder_hidden_states is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("attention re-weighting supports only transformer cross-attention layers")
        batch, queries, _ = hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, mask)
        probs = reweight_probabilities(probs, layer_weights(weights, queries), attn.heads, self.state.tokens)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def layer_weights(weights: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, queries) weight map of (B, H, W) ``weights`` area-resized to a layer of ``queries`` positions."""
    height, width = weights.shape[-2:]
    factor = math.sqrt(height * width / queries)
    size = (round(height / factor), round(width / factor))
    if size[0] * size[1] != queries:
        raise ValueError(f"a {height}x{width} weight map does not fit an attention layer of {queries} positions")
    return F.interpolate(weights[:, None].float(), size=size, mode="area").flatten(1)


def install_reweighting(unet: nn.Module, tokens: slice) -> AttentionWeights:
    """Put a :class:`ReweightingProcessor` on every cross-attention layer (``attn2``) of a diffusers UNet.

    Returns the shared state: set its ``weights`` before a UNet call to re-weight, None for plain attention.
    """
    state = AttentionWeights(tokens)
    processors = dict(unet.attn_processors)  # type: ignore[arg-type]
    for name, plain in processors.items():
        if name.endswith("attn2.processor"):
            processors[name] = ReweightingProcessor(state, plain)
    unet.set_attn_processor(processors)  # type: ignore[operator]
    return state
