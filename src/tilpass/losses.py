"""Cross-entropy through the output head, chunked, without the full logits tensor.

With a 49k vocabulary the logits of a 4 x 128 batch are 100 MB in float32, and a plain
`F.cross_entropy(head(h), y)` also allocates their log-softmax and its gradient: three such
buffers per step, each freshly page-faulted, for a result that is one number. Here the head
runs on a block of rows at a time; each block's gradient (softmax minus one-hot) is formed in
the block's own buffer and multiplied out at once into the gradients of the hidden states
(and of the head's weight and bias when they train). Only those gradients are kept for
the backward, which just scales them.
"""

from __future__ import annotations

from typing import Any

import torch

# Rows per block: about 4M logits (16 MB in float32), large enough for efficient GEMMs.
BLOCK_LOGITS = 1 << 22


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
