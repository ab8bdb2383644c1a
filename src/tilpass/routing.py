"""Per-row and per-token adapter routing: one batch whose tokens use different adapters.

Adapter names become integers at the API edge: `AdapterIds` gives every adapter of a model a
stable id (never reused, never shifted when another adapter is deleted). A call with
`adapter_names=` or `adapter_ids=` builds a `Routing` that lives only for that call (a context
variable, so nothing is left on the model and concurrent calls do not see each other). Ids are
per row (B,) or per token (B, T): a packed ragged batch (rows of different lengths laid end to
end, as a continuous-batching server runs them) routes by its per-token ids.

The first layer that sees a given token count builds a `Plan` (tokens grouped by adapter, with
tensor ops); the other layers reuse it. A layer then runs its adapter term for all groups at
once, one batched matmul pair per distinct rank present (never a loop over rows or adapters):

    tokens sorted by adapter -> (G, m, in) @ A^T -> (G, m, r) @ (s B)^T -> (G, m, out) -> scatter
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from tilpass.errors import AdapterNameError

BASE = "__base__"
BASE_ID = -1
MIN_GROUP_ROWS = 4
"""The fewest slots a group of a mixed batch gets (padded slots carry zeros).

A BLAS GEMM may round a row differently depending on how many rows the call has: MKL's
sgemm runs 1 to 3 rows through another kernel than 4 or more, each row of which rounds
exactly as in a call over the whole batch. With groups of at least 4 slots (when the batch
has 4 tokens or more), each row of a mixed batch equals its single-adapter run bit for bit,
not just within a tolerance; the padding costs nothing measurable.
"""


class AdapterIds:
    """Stable integer ids for a model's adapter names (the hot paths see only integers)."""

    def __init__(self) -> None:
        self._by_name: dict[str, int] = {}
        self._next = 0

    def assign(self, name: str) -> int:
        """Give `name` a new id (ids are never reused, so a stale id cannot alias)."""
        self._by_name[name] = self._next
        self._next += 1
        return self._by_name[name]

    def release(self, name: str) -> None:
        """Forget `name`; the other adapters keep their ids."""
        self._by_name.pop(name, None)

    def __getitem__(self, name: str) -> int:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> dict[int, str]:
        """id -> name for every adapter that exists now."""
        return {i: n for n, i in self._by_name.items()}

    def ids_for(self, names: Sequence[str]) -> torch.Tensor:
        """Per-row names -> ids, with an error that names the unknown adapters and the loaded
        ones (PEFT's message first)."""
        unknown = sorted({n for n in names if n != BASE and n not in self._by_name})
        if unknown:
            known = ", ".join(self._by_name) or "(none loaded)"
            raise AdapterNameError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Loaded "
                f"adapters: {known}; use {BASE!r} for the base model"
            )
        ids = [BASE_ID if n == BASE else self._by_name[n] for n in names]
        return torch.tensor(ids, dtype=torch.long)

    def skip_to(self, first_free: int) -> None:
        """Never assign ids below `first_free` (ids that layers of the model already use)."""
        self._next = max(self._next, first_free)

    def check(self, ids: torch.Tensor) -> torch.Tensor:
        """Validate an `adapter_ids` tensor from a caller: integer, known ids or -1."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("adapter_ids must be an integer tensor (one id per row or per token)")
        if ids.dim() not in (1, 2):
            raise ValueError(f"adapter_ids must be (batch,) or (batch, tokens), got {ids.shape}")
        known = torch.tensor([BASE_ID, *self._by_name.values()], device=ids.device)
        unknown = ids[~torch.isin(ids, known)]
        if unknown.numel():
            raise AdapterNameError(
                f"adapter_ids holds {int(unknown[0])}, which is no loaded adapter's id; ids: "
                f"{self._by_name} ({BASE_ID} = base model)"
            )
        return ids.long()


_CURRENT: ContextVar[Routing | None] = ContextVar("tilpass_routing", default=None)


class Routing:
    """The routing of one call: an adapter id per row (B,) or per token (B, T)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self._plans: dict[tuple[int, torch.device], Plan] = {}

    def plan(self, n_tokens: int, device: torch.device) -> Plan:
        """The grouping for `n_tokens` tokens laid out row-major (shared by every layer)."""
        key = (n_tokens, device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(self.ids, n_tokens, device)
        return plan


def current_routing() -> Routing | None:
    """The routing of the call in progress in this thread / task, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def routed(routing: Routing) -> Iterator[None]:
    """Route every adapter layer by `routing` within the block (and only there)."""
    token = _CURRENT.set(routing)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@dataclass
class Plan:
    """How the tokens of one forward pass group by adapter.

    Attributes:
        single: the one adapter id every token uses (-1 = base), or None for a real mix.
        present: (G,) ids of the adapters that occur, in group order.
        index: (G, m) token index of each group slot; padded slots point at token 0.
        mask: (G, m, 1) True for real slots; None when the groups are equal-sized.
        flat_index: `index` flattened, the scatter target of each slot.
        token_ids: (n,) adapter id of each token (-1 = base).
        inverse: (n,) slot of each token, when every token fills exactly one slot (no base
            rows, no padding): then results return by a gather instead of a scatter-add.
    """

    single: int | None
    present: torch.Tensor | None = None
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    flat_index: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    masks_by_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    subsets: dict[tuple[int, ...], Plan | None] = field(default_factory=dict)

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The padding mask in the activations' dtype (cached: one cast per forward)."""
        if self.mask is None:
            return None
        cached = self.masks_by_dtype.get(dtype)
        if cached is None:
            cached = self.masks_by_dtype[dtype] = self.mask.to(dtype)
        return cached

    def subset(self, ids: tuple[int, ...]) -> Plan | None:
        """This plan restricted to the groups of adapters `ids` (None if none occurs).

        Layers whose adapters differ in rank run one batched matmul pair per rank; each uses
        the groups of its rank's adapters. Cached per id set, so layers with the same rank
        layout share the work.
        """
        if ids in self.subsets:
            return self.subsets[ids]
        assert self.present is not None and self.index is not None
        wanted = torch.isin(self.present, torch.tensor(ids, device=self.present.device))
        sel = wanted.nonzero().squeeze(1)
        sub = None
        if sel.numel() == self.present.numel():
            sub = self
        elif sel.numel():
            index = self.index[sel]
            mask = self.mask[sel] if self.mask is not None else None
            sub = Plan(
                single=None,
                present=self.present[sel],
                index=index,
                mask=mask,
                flat_index=index.flatten(),
                token_ids=self.token_ids,
            )
        self.subsets[ids] = sub
        return sub


def token_ids_of(ids: torch.Tensor, n_tokens: int, device: torch.device) -> torch.Tensor:
    """Per-token ids (n,) for `n_tokens` tokens, from per-row (B,) or per-token (B, T) ids."""
    if ids.dim() == 2:
        if ids.numel() != n_tokens:
            raise ValueError(
                f"adapter_ids has {tuple(ids.shape)} = {ids.numel()} per-token entries but a "
                f"layer saw {n_tokens} tokens; per-token ids must cover every token (for "
                "generate, pass one id per row)"
            )
        return ids.reshape(-1).to(device)
    rows = ids.numel()
    if n_tokens % rows:
        raise ValueError(
            f"adapter_names has {rows} entries but a layer saw {n_tokens} tokens, which is not "
            "a whole number of rows; pass one adapter name per row of the batch"
        )
    return ids.to(device).repeat_interleave(n_tokens // rows)


def build_plan(ids: torch.Tensor, n_tokens: int, device: torch.device) -> Plan:
    """Group `n_tokens` tokens (row-major over `ids`) by adapter id with tensor ops."""
    token_ids = token_ids_of(ids, n_tokens, device)  # (n,)
    first = int(token_ids[0]) if n_tokens else BASE_ID
    if bool((token_ids == first).all()):
        return Plan(single=first)
    routed_mask = token_ids >= 0
    order = torch.argsort(torch.where(routed_mask, token_ids, token_ids.max() + 1), stable=True)
    order = order[: int(routed_mask.sum())]  # token indices, grouped by adapter
    present, counts = torch.unique_consecutive(token_ids[order], return_counts=True)
    # Groups of at least MIN_GROUP_ROWS slots (padding if needed): see its docstring.
    groups, width = present.numel(), max(int(counts.max()), min(MIN_GROUP_ROWS, n_tokens))
    if int(counts.min()) == width:  # equal groups: a plain reshape, no padding
        index = order.view(groups, width)
        inverse = torch.argsort(order) if order.numel() == n_tokens else None
        return Plan(
            single=None,
            present=present,
            index=index,
            flat_index=order,
            token_ids=token_ids,
            inverse=inverse,
        )
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    slot = torch.arange(width, device=device)  # (m,)
    valid = slot.unsqueeze(0) < counts.unsqueeze(1)  # (G, m)
    pos = (starts.unsqueeze(1) + slot.unsqueeze(0)).clamp(max=order.numel() - 1)
    index = torch.where(valid, order[pos], torch.zeros_like(pos))
    return Plan(
        single=None,
        present=present,
        index=index,
        mask=valid.unsqueeze(-1),
        flat_index=index.flatten(),
        token_ids=token_ids,
    )


def grouped_lora(
    x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, plan: Plan, out: torch.Tensor
) -> torch.Tensor:
    """Add per-token `x @ A_g^T @ B_g^T` (g = the token's adapter) into `out`, in place.

    Args:
        x: (n, in) activations, one row per token.
        a_t: (G, in, r) stacked `A^T` of the plan's present adapters, in `plan.present` order.
        b_t: (G, r, out) stacked `(scale * B)^T`, likewise.
        plan: the grouping from `Routing.plan` (or a subset of it).
        out: (n, out) base output; base-model tokens are left as they are.

    Returns:
        `out`.
    """
    assert plan.index is not None and plan.flat_index is not None
    h = x.index_select(0, plan.flat_index).view(*plan.index.shape, x.shape[-1])  # (G, m, in)
    h = torch.bmm(h, a_t)  # (G, m, r)
    mask = plan.mask_as(h.dtype)
    if mask is not None:
        h = h * mask  # padded slots contribute nothing
    return scatter_add_rows(torch.bmm(h, b_t), plan, out)


def grouped_b(h: torch.Tensor, b_t: torch.Tensor, plan: Plan, out: torch.Tensor) -> torch.Tensor:
    """Add per-token `h @ B_g^T` into `out` for rank-space inputs `h` (n, r)."""
    assert plan.index is not None and plan.flat_index is not None
    hg = h.index_select(0, plan.flat_index).view(*plan.index.shape, h.shape[-1])  # (G, m, r)
    mask = plan.mask_as(hg.dtype)
    if mask is not None:
        hg = hg * mask
    return scatter_add_rows(torch.bmm(hg, b_t), plan, out)


def scatter_add_rows(y: torch.Tensor, plan: Plan, out: torch.Tensor) -> torch.Tensor:
    """Add grouped outputs (G, m, out) to their tokens' rows of `out` (n, out), in place."""
    assert plan.flat_index is not None
    flat = y.reshape(-1, y.shape[-1])  # (G * m, out)
    if plan.inverse is not None:  # a gather back into token order beats a scatter-add
        return out.add_(flat.index_select(0, plan.inverse))
    # Padded slots point at token 0 and carry zeros, so index_add leaves it correct.
    return out.index_add_(0, plan.flat_index, flat)


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward call: the rows of `input_ids`, `inputs_embeds`, the first
    positional tensor or else the first tensor keyword argument (None if there is none)."""
    first = [v for v in kwargs.values() if isinstance(v, torch.Tensor)][:1]
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1], *first):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def routing_for(
    adapter_ids: AdapterIds,
    names: list[str] | None,
    ids: torch.Tensor | None,
    batch: int | None,
    training: bool,
    merged: list[str],
) -> Routing:
    """The checked routing of one call given per-row `names` or `ids` (PEFT's errors first:
    `adapter_names` is refused in train mode and while adapters are merged)."""
    if names is not None and ids is not None:
        raise ValueError("pass adapter_names or adapter_ids, not both")
    if names is not None:
        if isinstance(names, str):
            raise TypeError("adapter_names must be a list with one adapter name per row")
        if training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode (as in "
                "PEFT): call model.eval() first, or, to train on a mixed batch, pass "
                "adapter_ids= (model.adapter_id(name) per row)"
            )
        ids = adapter_ids.ids_for(names)
    else:
        assert ids is not None
        ids = adapter_ids.check(ids)
    if batch is not None and ids.shape[0] != batch:
        what = "adapter_names" if names is not None else "adapter_ids"
        raise ValueError(
            f"Length of `{what}` should be the same as the number of inputs, but got "
            f"{ids.shape[0]} and {batch}: {what} has {ids.shape[0]} entries but the batch "
            f"has {batch} rows; pass one per row ({BASE!r} / -1 for the base model)"
        )
    if merged:
        raise ValueError(
            f"Cannot pass `adapter_names` when there are merged adapters, please call "
            f"`unmerge_adapter` first (adapters {merged} are merged into the weights, so "
            "rows cannot be routed)"
        )
    return Routing(ids)
