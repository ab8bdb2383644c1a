"""Float64 reference for prompt tuning, written from the paper, never imported by src/."""

from __future__ import annotations

import torch
from torch import nn


def causal_lm_logits(base: nn.Module, virtual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits of `base` on [V ; embed(x)] at positions 0 .. P + T - 1, all ones mask (in the
    base model's dtype: pass a float64 model for a float64 reference).

    Lester et al. (2021): the virtual-token embeddings V (P, H) are concatenated in front of
    the input's token embeddings and the frozen model runs on the result unchanged.
    """
    embeds = base.get_input_embeddings()(x)  # (B, T, H)
    prefix = virtual.to(embeds.dtype).expand(x.shape[0], -1, -1)  # (B, P, H)
    inputs = torch.cat([prefix, embeds], dim=1)  # (B, P + T, H)
    length = inputs.shape[1]
    mask = torch.ones(x.shape[0], length, dtype=torch.long)
    positions = torch.arange(length).expand(x.shape[0], length)
    with torch.no_grad():
        return base(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).logits
