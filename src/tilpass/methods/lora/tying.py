"""LoRA on layers tied to the input embedding (`ensure_weight_tying=True`), as PEFT ties them.

A tied output layer computes x W^T with W the embedding table E (vocab, dim). The embedding's
adapter changes E by s * A_e^T B_e^T (A_e (r, vocab), B_e (dim, r)); the tied linear layer's
adapter changes W by s * B A. Taking

    A = B_e^T  (r, dim),    B = A_e^T  (vocab, r)

makes the two updates the same matrix, so the layers stay tied. As in PEFT, A and B are
parameters of their own that share storage with the embedding's factors (transposed views):
their values are always equal, and each gets its own gradient. Another embedding tied to the
input embedding (an encoder-decoder's per-stack copies) uses the embedding's factors
themselves.
"""

from __future__ import annotations

from torch import nn

from tilpass.methods.lora.embedding import LoraEmbedding
from tilpass.methods.lora.layers import LoraLayer, LoraLinear


def tie_to_embedding(layer: LoraLayer, embedding: LoraLayer, name: str) -> None:
    """Make `layer`'s adapter `name` use `embedding`'s adapter `name` (see the module doc)."""
    if not isinstance(embedding, LoraEmbedding):
        raise ValueError(
            f"ensure_weight_tying=True ties adapters to the input embedding's LoRA layer, but "
            f"it is a {type(embedding).__name__}; target the embedding itself"
        )
    mine, theirs = layer.specs[name], embedding.specs[name]
    if (mine.r, mine.scale, mine.variant) != (theirs.r, theirs.scale, theirs.variant):
        raise ValueError(
            f"ensure_weight_tying=True: adapter {name!r} has r={mine.r}, scale={mine.scale} on "
            f"a tied layer but r={theirs.r}, scale={theirs.scale} on the input embedding (or "
            "DoRA on one of them); tied layers need the same rank and alpha, so leave them out "
            "of rank_pattern / alpha_pattern"
        )
    if mine.variant is not None:
        raise ValueError(
            "ensure_weight_tying=True does not support use_dora=True: a DoRA magnitude is per "
            "layer, so the tied layers would differ; use plain LoRA or leave the tie off"
        )
    a_e, b_e = embedding.lora_embedding_A[name], embedding.lora_embedding_B[name]
    if isinstance(layer, LoraEmbedding):
        layer.lora_embedding_A[name] = a_e
        layer.lora_embedding_B[name] = b_e
        return
    if not isinstance(layer, LoraLinear) or layer.lora_A[name].shape != b_e.T.shape:
        raise ValueError(
            f"ensure_weight_tying=True: a {type(layer).__name__} with adapter shapes "
            f"{tuple(layer.lora_A[name].shape)} / {tuple(layer.lora_B[name].shape)} cannot share "
            f"the input embedding's {tuple(a_e.shape)} / {tuple(b_e.shape)} adapter; only a "
            "linear layer with the embedding's (transposed) weight can be tied"
        )
    layer.lora_A[name] = nn.Parameter(b_e.detach().T, requires_grad=b_e.requires_grad)
    layer.lora_B[name] = nn.Parameter(a_e.detach().T, requires_grad=a_e.requires_grad)
