"""`trainable_token_indices`: a few rows of an embedding matrix trained in full (PEFT's
TrainableTokens), beside LoRA, for new or special tokens.

For token ids I and trained rows D (|I|, dim), the embedding becomes

    y = W'[ids],   W' = W with W[I] replaced by D

Only the chosen rows are trained and saved (key `<embedding>.token_adapter.trainable_tokens_delta`,
PEFT's), never the whole matrix. The forward looks the base embedding up and then overwrites the
outputs of the chosen tokens, which equals PEFT's lookup in W' without copying W on each call.
Merging writes D into W's rows; unmerging writes the original rows back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tilpass.layers import AdapterLayer
from tilpass.routing import Plan

DELTA_KEY = "token_adapter.trainable_tokens_delta"


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """The token ids whose rows an adapter trains, and how to start them."""

    indices: tuple[int, ...]
    init: bool | None = True  # True: the base rows; False: random; None: about to be loaded


class TrainableTokens(AdapterLayer):
    """Trains the rows `indices` of an `nn.Embedding` per adapter; every other row stays frozen."""

    STORES = ("trainable_tokens_delta",)
    MERGEABLE = True
    STATUS_TYPE = "TrainableTokensLayer"
    AUXILIARY = True
    STATUS_SUFFIX = ".token_adapter"  # PEFT's status names its layer inside the wrapper

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.trainable_tokens_delta = nn.ParameterDict()
        self.originals: dict[str, torch.Tensor] = {}  # the base rows, for unmerging
        self.slots: dict[str, torch.Tensor] = {}  # adapter -> (vocab,) row of each id in D, or -1

    def create(self, name: str, spec: TokenSpec) -> None:
        """Copy (or randomise) the chosen rows as adapter `name`'s trainable rows."""
        weight = self.base_layer.weight
        bad = [i for i in spec.indices if not 0 <= i < self.num_embeddings]
        if bad:
            raise ValueError(
                f"trainable_token_indices {bad} are outside the embedding's "
                f"{self.num_embeddings} rows"
            )
        index = torch.tensor(spec.indices, dtype=torch.long, device=weight.device)
        originals = weight.detach()[index].clone()  # (|I|, dim)
        values = originals.clone()
        if spec.init is False:
            values = torch.randn_like(originals)
        self.trainable_tokens_delta[name] = nn.Parameter(values)
        self.originals[name] = originals
        slots = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=weight.device)
        slots[index] = torch.arange(len(spec.indices), device=weight.device)
        self.slots[name] = slots

    def delete(self, name: str) -> None:
        super().delete(name)
        self.originals.pop(name, None)
        self.slots.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.trainable_tokens_delta:
            return {}
        return {DELTA_KEY: self.trainable_tokens_delta[name]}

    def rows(self, x: torch.Tensor) -> int:
        return x.numel()  # one output row per token id

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        slot = self.slots[name].to(x.device)[x]  # (...,) row in D, or -1
        rows = self.trainable_tokens_delta[name][slot.clamp(min=0)].to(result.dtype)  # (..., dim)
        return torch.where((slot >= 0).unsqueeze(-1), rows, result)

    def mixed_forward(self, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any) -> torch.Tensor:
        """Each token takes its own adapter's rows (one pass per adapter present)."""
        result = self.base_forward(x, *args, **kw)
        assert plan.token_ids is not None and plan.present is not None
        owner = plan.token_ids.view(x.shape)
        for adapter_id in plan.present.tolist():
            name = self.name_of.get(adapter_id)
            if name is None:
                continue
            mine = self.apply_adapter(x, result, name)
            result = torch.where((owner == adapter_id).unsqueeze(-1), mine, result)
        return result

    def merge_targets(self) -> list[str]:
        return ["weight"]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Write the adapters' rows into the embedding matrix; merging twice is a no-op."""
        weight = self.base_layer.weight
        for name in self.active if names is None else names:
            if name not in self.specs or name in self.merged:
                continue
            index = torch.tensor(self.specs[name].indices, device=weight.device)
            weight.index_copy_(0, index, self.trainable_tokens_delta[name].to(weight.dtype))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Write the original rows back, last merged first."""
        weight = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            index = torch.tensor(self.specs[name].indices, device=weight.device)
            weight.index_copy_(0, index, self.originals[name].to(weight.dtype))


def token_targets(
    model: nn.Module, indices: list[int] | dict[str, list[int]]
) -> dict[str, list[int]]:
    """Module name (as written, matched like modules_to_save) -> token ids to train. A plain list
    means the model's input embedding, as in PEFT."""
    if isinstance(indices, dict):
        return {str(k): list(v) for k, v in indices.items()}
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    names = [n for n, m in model.named_modules() if embedding is not None and m is embedding]
    return {names[0] if names else "embed_tokens": list(indices)}
