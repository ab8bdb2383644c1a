"""The engine's packed step: prefill and decode of every running sequence in one forward pass.

Each step lays the new tokens of all sequences end to end, (1, N): one token for each
sequence that is decoding, and the next chunk of its prompt for each that is still
prefilling (at most `max_step_tokens` tokens in all, so a long prompt is spread over several
steps and the others keep decoding). Every token carries its own position and adapter id
(per-token routing through `routing.py`); the keys and values go to the sequence's own slot
of a `slots.SlotCache`, and only the positions that end a sequence's input this step are
projected to logits. A sequence that joins or leaves touches only its own slot.

Adapters that extend the inputs (prompt tuning) extend a sequence's prompt once, when it
joins: its chunks are then taken from those embeddings, and the other tokens of the step are
embedded by the model's input embedding, so every method serves in the same batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from tilpass.inputs import extend_inputs
from tilpass.routing import BASE_ID, Routing, routed
from tilpass.serve.slots import SlotCache, build_layout, packed_step

MAX_STEP_TOKENS = 512


@dataclass
class SlotRow:
    """A running sequence's place in the packed batch.

    Attributes:
        slot: its slot in the cache.
        adapter_id: its adapter's id (-1 = the base model).
        prompt: the prompt's token ids, or None when `embeds` holds the extended prompt.
        embeds: (P + T, hidden) the prompt with its virtual tokens (prompt tuning), or None.
        fed: prompt positions already in the cache (the prompt's length once decoding).
        length: positions in the cache.
    """

    slot: int
    adapter_id: int
    prompt: list[int] | None
    embeds: torch.Tensor | None
    fed: int = 0
    length: int = 0

    @property
    def prompt_length(self) -> int:
        return len(self.prompt) if self.prompt is not None else int(self.embeds.shape[0])  # type: ignore[union-attr]

    @property
    def prefilling(self) -> bool:
        return self.fed < self.prompt_length


@dataclass
class Part:
    """One sequence's tokens in a step: ids (or embeddings) starting at cache column `start`."""

    key: int
    row: SlotRow
    start: int
    ids: list[int] | None
    embeds: torch.Tensor | None
    ends_input: bool  # its last token's logits pick the sequence's next token

    @property
    def count(self) -> int:
        return len(self.ids) if self.ids is not None else int(self.embeds.shape[0])  # type: ignore[union-attr]


class PackedBatch:
    """The running sequences' slots and the one forward pass of each step."""

    def __init__(self, model: Any, slots: int, max_step_tokens: int = MAX_STEP_TOKENS) -> None:
        self.model = model  # the AdaptedModel
        self.base = model.get_base_model()
        self.device = next(model.parameters()).device
        self.cache = SlotCache(slots)
        self.rows: dict[int, SlotRow] = {}  # by id() of the engine's Sequence
        self.free = list(range(slots))
        self.max_step_tokens = max(1, max_step_tokens)
        self.cache_keyword = "cache" if "cache" in _parameters(self.base) else "past_key_values"

    def join(self, key: int, adapter_id: int, prompt: list[int]) -> None:
        """Give a new sequence a slot (its prompt is fed by the next steps)."""
        slot = min(self.free)
        self.free.remove(slot)
        embeds = self.extended_prompt(adapter_id, prompt)
        self.rows[key] = SlotRow(slot, adapter_id, None if embeds is not None else prompt, embeds)

    def leave(self, key: int) -> None:
        """Free a finished or cancelled sequence's slot."""
        row = self.rows.pop(key, None)
        if row is not None:
            self.free.append(row.slot)
        if not self.rows:  # an idle engine keeps no buffers
            self.cache = SlotCache(self.cache.slots)

    def extended_prompt(self, adapter_id: int, prompt: list[int]) -> torch.Tensor | None:
        """The prompt's embeddings with its adapter's virtual tokens, when an adapter layer
        extends this row's inputs (else None: the prompt goes in as ids)."""
        layers = [x for x in self.model.adapter_layer_list() if x.EXTENDS_INPUTS]
        if adapter_id == BASE_ID or not layers:
            return None
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        routing = Routing(torch.tensor([adapter_id], dtype=torch.long, device=self.device))
        with torch.inference_mode():
            _, out = extend_inputs(layers, (), {"input_ids": ids}, routing)
        if "inputs_embeds" not in out:
            return None
        mask = out.get("attention_mask")
        embeds = out["inputs_embeds"][0]  # (P + T, H)
        return embeds if mask is None else embeds[mask[0].bool()]

    def plan(self, order: list[tuple[int, int]]) -> list[Part]:
        """This step's parts, in slot order: one token per decoding sequence (its `last`
        token), then prompt chunks within the token budget. `order` is (key, last token)
        of every running sequence."""
        decoding = [(k, t) for k, t in order if not self.rows[k].prefilling]
        parts = [Part(k, self.rows[k], self.rows[k].length, [t], None, True) for k, t in decoding]
        budget = max(self.max_step_tokens - len(parts), 1)  # a prompt always progresses
        for key, _ in order:
            row = self.rows[key]
            if not row.prefilling or budget <= 0:
                continue
            take = min(budget, row.prompt_length - row.fed)
            end = row.fed + take
            ids = row.prompt[row.fed : end] if row.prompt is not None else None
            embeds = row.embeds[row.fed : end] if row.embeds is not None else None
            parts.append(Part(key, row, row.length, ids, embeds, end == row.prompt_length))
            budget -= take
        return sorted(parts, key=lambda p: p.row.slot)

    def step(self, order: list[tuple[int, int]]) -> tuple[list[int], torch.Tensor]:
        """One forward pass; (keys of the sequences that get a token, their logits (K, V))."""
        parts = self.plan(order)
        if not parts:
            return [], torch.empty(0)
        layout = build_layout([(p.row.slot, p.start, p.count) for p in parts], self.device)
        self.cache.reserve(layout.columns)
        counts = torch.tensor([p.count for p in parts])
        ends = torch.cumsum(counts, 0) - 1  # (P,) packed index of each part's last token
        keep = ends[torch.tensor([p.ends_input for p in parts])].to(self.device)
        ids = torch.tensor([p.row.adapter_id for p in parts]).repeat_interleave(counts)
        routing = Routing(ids.view(1, -1).to(self.device))  # per-token adapter ids (1, N)
        kwargs: dict[str, Any] = {
            "position_ids": layout.token_pos.view(1, -1),
            "attention_mask": layout.mask,  # 4-D: the model takes it as it is
            self.cache_keyword: self.cache,
            "use_cache": True,
            "logits_to_keep": keep,
        }
        with torch.inference_mode(), routed(routing):
            kwargs.update(self.inputs(parts))
            with packed_step(self.base, layout):
                out = self.base(**kwargs)
        for part in parts:
            part.row.length += part.count
            if part.row.prefilling:
                part.row.fed += part.count
        logits = out.logits[0].float().cpu()  # (K, V)
        return [p.key for p in parts if p.ends_input], logits

    def inputs(self, parts: list[Part]) -> dict[str, torch.Tensor]:
        """`input_ids` (1, N), or `inputs_embeds` (1, N, H) when a part brings embeddings
        (the other parts' ids then go through the input embedding in one call)."""
        id_parts = [p for p in parts if p.ids is not None]
        flat = torch.tensor([[t for p in id_parts for t in p.ids]], dtype=torch.long)  # type: ignore[union-attr]
        if len(id_parts) == len(parts):
            return {"input_ids": flat.to(self.device)}
        chunks: list[torch.Tensor] = []
        if id_parts:
            counts = torch.tensor([p.count for p in id_parts])
            rows = torch.tensor([p.row.adapter_id for p in id_parts]).repeat_interleave(counts)
            with routed(Routing(rows.view(1, -1).to(self.device))):
                embedded = self.base.get_input_embeddings()(flat.to(self.device))[0]  # (M, H)
            chunks = list(embedded.split(counts.tolist()))
        pieces = [p.embeds if p.embeds is not None else chunks.pop(0) for p in parts]
        return {"inputs_embeds": torch.cat(pieces).unsqueeze(0)}


def _parameters(module: Any) -> set[str]:
    return set(inspect.signature(module.forward).parameters)
