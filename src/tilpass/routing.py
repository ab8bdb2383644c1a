"""Per-row adapter routing: one batch whose rows use different adapters, in one forward pass.

The model-level call turns adapter names into an integer tensor (one id per row, -1 for the
base model) and hands it to a `Router` that every adapter layer shares. The first layer that
sees a given token count builds a `Plan` (rows grouped by adapter, with tensor ops); the
other layers reuse it. A layer then runs its low-rank term for all groups at once:

    tokens sorted by adapter -> (G, m, in) @ A^T -> (G, m, r) @ (s B)^T -> (G, m, out) -> scatter

so the cost is one batched matmul pair, never a Python loop over rows or adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE = "__base__"


@dataclass
class Plan:
    """How the tokens of one forward pass group by adapter.

    Attributes:
        single: the one adapter id every token uses (-1 = base), or None for a real mix.
        present: (G,) global ids of the adapters that occur, in group order.
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

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The padding mask in the activations' dtype (cached: one cast per forward)."""
        if self.mask is None:
            return None
        cached = self.masks_by_dtype.get(dtype)
        if cached is None:
            cached = self.masks_by_dtype[dtype] = self.mask.to(dtype)
        return cached


class Router:
    """Shared by every adapter layer of one model: the adapter names and the current row ids."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.row_ids: torch.Tensor | None = None  # (B,) long; -1 = base model
        self._plans: dict[tuple[int, torch.device], Plan] = {}

    @property
    def active(self) -> bool:
        """True while a mixed-batch call is in progress."""
        return self.row_ids is not None

    def ids_for(self, names: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Turn per-row adapter names into ids, with a clear error for an unknown name."""
        index = {name: i for i, name in enumerate(self.names)}
        ids = []
        for row, name in enumerate(names):
            if name == BASE:
                ids.append(-1)
            elif name in index:
                ids.append(index[name])
            else:
                from tilpass.errors import AdapterNameError

                known = ", ".join(self.names) or "(none loaded)"
                raise AdapterNameError(
                    f"adapter_names[{row}] = {name!r} is not a loaded adapter; "
                    f"loaded: {known}; use {BASE!r} for the base model"
                )
        return torch.tensor(ids, dtype=torch.long)

    def begin(self, row_ids: torch.Tensor) -> None:
        """Start routing a batch; plans from an earlier batch are dropped."""
        self.row_ids = row_ids
        self._plans.clear()

    def end(self) -> None:
        """Stop routing; layers go back to the active adapters."""
        self.row_ids = None
        self._plans.clear()

    def plan(self, n_tokens: int, device: torch.device) -> Plan:
        """The grouping for `n_tokens` tokens laid out row-major over the routed rows."""
        key = (n_tokens, device)
        plan = self._plans.get(key)
        if plan is None:
            assert self.row_ids is not None
            plan = self._plans[key] = build_plan(self.row_ids, n_tokens, device)
        return plan


def build_plan(row_ids: torch.Tensor, n_tokens: int, device: torch.device) -> Plan:
    """Group `n_tokens` tokens (row-major over `row_ids`) by adapter id with tensor ops."""
    rows = row_ids.numel()
    if n_tokens % rows:
        raise ValueError(
            f"adapter_names has {rows} entries but a layer saw {n_tokens} tokens, which is not "
            "a whole number of rows; pass one adapter name per row of the batch"
        )
    first = int(row_ids[0])
    if bool((row_ids == first).all()):
        return Plan(single=first)
    token_ids = row_ids.to(device).repeat_interleave(n_tokens // rows)  # (n,)
    routed = token_ids >= 0
    order = torch.argsort(torch.where(routed, token_ids, token_ids.max() + 1), stable=True)
    order = order[: int(routed.sum())]  # token indices, grouped by adapter
    present, counts = torch.unique_consecutive(token_ids[order], return_counts=True)
    groups, width = present.numel(), int(counts.max())
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
        a_t: (G_all, in, r) stacked `A^T` of every adapter, indexed by global id.
        b_t: (G_all, r, out) stacked `(scale * B)^T`.
        plan: the grouping from `Router.plan`.
        out: (n, out) base output; base-model tokens are left as they are.

    Returns:
        `out`.
    """
    assert plan.index is not None and plan.flat_index is not None
    h = x.index_select(0, plan.flat_index).view(*plan.index.shape, x.shape[-1])  # (G, m, in)
    present = plan.present
    if present is not None and present.numel() != a_t.shape[0]:
        a_t, b_t = a_t[present], b_t[present]  # only the adapters in this batch
    h = torch.bmm(h, a_t)  # (G, m, r)
    mask = plan.mask_as(h.dtype)
    if mask is not None:
        h = h * mask  # padded slots contribute nothing
    return scatter_add_rows(torch.bmm(h, b_t), plan, out)


def grouped_b(h: torch.Tensor, b_t: torch.Tensor, plan: Plan, out: torch.Tensor) -> torch.Tensor:
    """Add per-token `h @ B_g^T` into `out` for rank-space inputs `h` (n, r)."""
    assert plan.index is not None and plan.flat_index is not None
    hg = h.index_select(0, plan.flat_index).view(*plan.index.shape, h.shape[-1])  # (G, m, r)
    present = plan.present
    if present is not None and present.numel() != b_t.shape[0]:
        b_t = b_t[present]
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
