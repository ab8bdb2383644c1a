"""The training loss: next-token cross-entropy of a causal LM, summed, with its token count.

Training and evaluation compute the very same number from here. It is a *summed*
cross-entropy plus a token count, so callers can normalise over any group of micro-batches
(gradient accumulation) or a whole evaluation set::

    loss = sum_{b, t : labels[b, t+1] != IGNORE_INDEX} CE(head(h[b, t]), labels[b, t+1])

Selective head: with ``selective=True`` the language-model head runs only on the hidden states
``h[b, t]`` that carry loss, instead of on every position: with 49k-token vocabularies the full
``(B, T, V)`` logits tensor dominates time and memory. :func:`selective_loss_matches` checks
once per run that this equals the model's own forward.

Blockwise cross-entropy (:func:`linear_cross_entropy`, for a frozen head): the logits of a
4 x 128 batch are 100 MB in float32, and a plain `F.cross_entropy(head(h), y)` also allocates
their log-softmax and its gradient: three such buffers per step, each freshly page-faulted, for
a result that is one number. Here the head runs on a block of rows at a time; each block's
gradient (softmax minus one-hot) is formed in the block's own buffer and multiplied out at once
into the gradients of the hidden states (and of the head's weight and bias when they train).
Only those gradients are kept for the backward, which just scales them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Labels with this value carry no loss (PyTorch's and transformers' convention).
IGNORE_INDEX = -100
# Rows per block: about 4M logits (16 MB in float32), large enough for efficient GEMMs.
BLOCK_LOGITS = 1 << 22

Batch = dict[str, torch.Tensor]


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i), its gradients computed in the forward, block by block."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
    ) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        ct = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        grad_w = torch.zeros_like(weight, dtype=ct) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=ct) if need_b else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        step = max(1, BLOCK_LOGITS // max(vocab, 1))
        w_c = weight.to(ct)  # no copy when the weight already has the compute dtype
        for start in range(0, n, step):
            h_c = hidden[start : start + step].to(ct)
            y = target[start : start + step]
            logits = h_c @ w_c.T if bias is None else torch.addmm(bias.to(ct), h_c, w_c.T)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64)
            if not (need_h or need_w or need_b):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
            probs[torch.arange(len(y), device=y.device), y] -= 1  # d loss / d logits
            if grad_h is not None and grad_h.dtype == ct:
                torch.mm(probs, w_c, out=grad_h[start : start + step])
            elif grad_h is not None:
                grad_h[start : start + step] = (probs @ w_c).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(probs.T, h_c)
            if grad_b is not None:
                grad_b += probs.sum(dim=0)
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b))
        )
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total.to(ct)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        out: list[torch.Tensor | None] = []
        for tensor, present, dtype in zip(saved, ctx.present, ctx.dtypes, strict=True):
            # Out of place: a retained graph may run this backward again.
            out.append((tensor * grad.to(tensor.dtype)).to(dtype) if present else None)
        return out[0], out[1], out[2], None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `target` (no ignored rows).

    Equal to `F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum")`,
    computed in float32 at least (float64 inputs stay float64), in blocks of rows.
    """
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= weight.shape[0]):
        raise ValueError(
            f"label ids must lie in [0, {weight.shape[0]}) for this model's head; found "
            f"{int(target.min())}..{int(target.max())} (ignored positions must be removed first)"
        )
    loss = LinearCrossEntropy.apply(hidden, weight, bias, target)
    assert isinstance(loss, torch.Tensor)
    return loss


def unwrap_base(model: nn.Module) -> nn.Module:
    """Return the transformers model under an adapter wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Split a causal LM into (decoder body, output head), or None if it has no such structure."""
    if getattr(model, "extends_inputs", False):
        return None  # the wrapper adds inputs (virtual tokens) that the decoder alone lacks
    base = unwrap_base(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(base, "model", None)
    if not isinstance(head, nn.Module) or not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return decoder, head


def trim_padding(batch: Batch) -> Batch:
    """Drop trailing columns that are padding in every row (right-padded batches only)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    used = mask.bool().any(dim=0).nonzero()
    width = mask.shape[1]
    end = int(used[-1]) + 1 if used.numel() else width
    if end == width:
        return batch
    return {
        k: v[:, :end] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == width else v
        for k, v in batch.items()
    }


def count_loss_tokens(batch: Batch) -> int:
    """Number of positions whose next-token label is not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _logits_of(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _hidden_of(output: Any) -> torch.Tensor:
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _hf_kwargs(model: nn.Module) -> dict[str, Any]:
    # Transformers models accept use_cache; a plain nn.Module may not.
    return {"use_cache": False} if hasattr(unwrap_base(model), "config") else {}


def causal_lm_loss(
    model: nn.Module, batch: Batch, selective: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions that carry loss, and their count.

    Args:
        model: A causal LM (transformers model, adapter wrapper, or any module returning logits).
        batch: ``input_ids``, ``labels`` (-100 = ignored) and optionally ``attention_mask`` and
            ``position_ids`` (packed rows).
        selective: Run the head only where loss is taken (needs a decoder/head split; falls back
            to the full forward otherwise).

    Returns:
        (summed loss as a scalar tensor in at least float32, number of loss tokens).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    # Packed rows carry position ids that restart per example (and no attention mask).
    extra = _hf_kwargs(model)
    if "position_ids" in batch:
        extra["position_ids"] = batch["position_ids"]
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    parts = decoder_and_head(model) if selective else None
    if parts is not None:
        decoder, head = parts
        hidden = _hidden_of(decoder(input_ids=input_ids, attention_mask=mask, **extra))  # (B, T, H)
        selected = hidden[:, :-1][keep]  # (N, H)
        # A frozen head (LoRA) goes blockwise: the (N, V) logits are never materialised. A
        # trained head stays on the plain path: blockwise, each block would update the whole
        # (V, H) weight gradient, which costs more than the logits it saves (benchmarked).
        if type(head) is nn.Linear and not head.weight.requires_grad:
            loss = linear_cross_entropy(selected, head.weight, head.bias, target[keep])
            return loss, int(keep.sum())
        logits = head(selected)  # (N, V)
    else:
        out = model(input_ids=input_ids, attention_mask=mask, **extra)
        # A wrapper may return logits for positions it prepended (virtual tokens) before the
        # T real ones; the loss is over the real ones.
        logits = _logits_of(out)[:, -input_ids.shape[1] :][:, :-1][keep]  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    return loss, int(keep.sum())


CHECK_ROWS = 2
"""Rows of a batch :func:`selective_loss_matches` runs both ways."""


def _per_row(value: Any, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows


def selective_loss_matches(
    model: nn.Module, batch: Batch, autocast: AbstractContextManager[Any] | None = None
) -> bool:
    """Check once that the selective loss equals the full-forward loss on ``batch``.

    Catches wrappers whose forward does more than decoder + head (prompt tuning's virtual
    tokens, logit soft-capping or scaling), for which the selective path would be wrong.
    """
    if decoder_and_head(model) is None:
        return False
    rows = batch["input_ids"].shape[0]
    if rows > CHECK_ROWS:  # two rows show a difference as well as the whole batch, cheaper
        batch = {k: v[:CHECK_ROWS] if _per_row(v, rows) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast or nullcontext():
            fast, _ = causal_lm_loss(model, batch, selective=True)
            full, _ = causal_lm_loss(model, batch, selective=False)
    finally:
        model.train(was_training)
    low_precision = autocast is not None and getattr(autocast, "fast_dtype", None) in (
        torch.bfloat16,
        torch.float16,
    )
    tol = 2e-2 if low_precision else 1e-4
    return bool(torch.isclose(fast.double(), full.double(), rtol=tol, atol=tol))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a batch to ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
