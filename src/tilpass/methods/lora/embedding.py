"""LoRA (and DoRA) over `nn.Embedding`: the factors are bare parameters, as PEFT keys them.

    y = W[ids] + s * A^T[ids] B^T                  A (r, vocab), B (dim, r)

DoRA (PEFT's embedding variant) rescales each embedding dimension j by m_j / ||W + s (B A)^T||
over the vocabulary, the norm detached (`dora.DoraEmbeddingVariant`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tilpass.methods.lora.dora import EMBEDDING_DORA
from tilpass.methods.lora.layers import AdapterSpec, LoraLayer
from tilpass.routing import Plan, grouped_b


class LoraEmbedding(LoraLayer):
    """LoRA over `nn.Embedding`: y = W[ids] + s * A^T[ids] B^T (A is (r, vocab), B (dim, r))."""

    STORES = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    STATUS_TYPE = "lora.Embedding"
    A_KEY = "lora_embedding_A"
    B_KEY = "lora_embedding_B"

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.out_features = self.embedding_dim  # what DoRA's magnitude is per
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    def rows(self, x: torch.Tensor) -> int:
        return x.numel()  # one output row per token id

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            ids,
            table,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.specs:
            return {}  # PEFT stores embedding LoRA factors as bare parameters
        out = {
            "lora_embedding_A": self.lora_embedding_A[name],
            "lora_embedding_B": self.lora_embedding_B[name],
        }
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    def variant_for(self, name: str) -> Any:
        return EMBEDDING_DORA if self.specs[name].variant is not None else None

    def row_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta|| per embedding dimension (over the vocabulary), as PEFT's DoRA."""
        w = self.base_layer.weight.to(delta.dtype) + delta
        return torch.linalg.norm(w, dim=0)  # (dim,)

    def per_output(self, values: torch.Tensor) -> torch.Tensor:
        """A per-dimension vector shaped to broadcast over W (vocab, dim)."""
        return values.view(1, -1)

    def create(self, name: str, spec: AdapterSpec) -> None:
        """Create adapter `name`: A zero and B normal (PEFT's embedding init, whatever
        `init_lora_weights` names, as in PEFT), or both random for `False`."""
        if spec.lora_bias:
            raise ValueError(
                "lora_bias=True is not supported for Embedding layers (as in PEFT); leave the "
                "embedding out of target_modules or set lora_bias=False"
            )
        weight = self.base_layer.weight
        kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        a = torch.empty(spec.r, self.num_embeddings, **kw)
        b = torch.empty(self.embedding_dim, spec.r, **kw)
        if spec.init is not None:  # None: left empty, every tensor is about to be loaded
            nn.init.normal_(a)
            nn.init.normal_(b)
            if spec.init is not False:
                nn.init.zeros_(a)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        if spec.variant is not None:
            self.specs[name] = spec
            EMBEDDING_DORA.create(self, name, spec.init is not None, kw)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)).T * self.specs[name].scale  # (vocab, dim)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        h = self.embed(x, a.T)  # (..., r)
        # (s B)^T as the mixed path stacks it, so a mixed batch's rows round the same way
        b_t = (b.T * self.specs[name].scale).contiguous()  # (r, dim)
        lora = torch.mm(h.reshape(-1, h.shape[-1]), b_t).view(*h.shape[:-1], -1)  # (..., dim)
        lora = lora.to(result.dtype)
        if self.specs[name].variant is not None:
            return EMBEDDING_DORA.scaled(self, name, result, lora)
        return result + lora

    def stack_pair(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.specs[name].scale
        return self.lora_embedding_A[name].T.to(dtype), (self.lora_embedding_B[name].T * scale).to(
            dtype
        )

    def mixed_forward(self, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any) -> torch.Tensor:
        result = self.base_forward(x, *args, **kw)
        ids = x.reshape(-1)
        flat = result.reshape(-1, self.embedding_dim)
        if not result.is_contiguous():
            flat = flat.clone()
        assert plan.token_ids is not None
        for sub, stack, _, b_t in self.rank_groups(plan, result.dtype):
            # Each token's row of its own adapter's A^T (G, vocab, r); tokens of adapters
            # outside this stack read some row but are never scattered back (the sub-plan
            # holds only this stack's groups).
            table = stack.row_of_id.to(ids.device)
            rows = table[plan.token_ids.clamp(0, table.numel() - 1)].clamp(min=0)  # (n,)
            h = stack.a_t[rows, ids]  # (n, r)
            grouped_b(h, b_t, sub, flat)
        return flat.view(result.shape)
