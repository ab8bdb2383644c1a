"""A LoRA linear layer as one autograd node: base GEMM and adapter in fewer kernels.

With a frozen base, y = x W^T + b + s (d(x) A^T) B^T needs, per step, the base GEMM, the
input gradient g W, and four rank-r GEMMs. Built from separate autograd ops it also pays for
an out-of-place copy of the output in the forward, a full-size add of the two input
gradients in the backward, and a node per op. Here the small product is computed first and
the large GEMMs accumulate into it (BLAS's beta = 1), in the forward and in the backward.
The layer falls back to plain autograd ops whenever this node does not apply (a trainable
base weight, autocast, DoRA, mixed-adapter batches).
"""

from __future__ import annotations

from typing import Any

import torch


class LoraLinearFunction(torch.autograd.Function):
    """y = x W_t + bias + (xd A^T)(s B)^T, W_t = W^T (Linear) or W (Conv1D), W and bias frozen.

    `xd` is the LoRA branch's input: `x` itself, or `dropout(x)` computed outside (then its
    backward runs through autograd's dropout node).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        xd: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        w_t: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        xd2d = x2d if xd is x else xd.reshape(-1, xd.shape[-1])
        h = torch.mm(xd2d, a.T.contiguous())  # (n, r)
        # A^T and (s B)^T, contiguous: the same operands, rounded the same way, as the no-grad and
        # mixed-batch paths use, so all three give the same result bit for bit.
        b_t = (b.T * scale).contiguous()  # (r, out)
        out = lora_plus_bias(h, b_t, bias)
        out.addmm_(x2d, w_t)  # the base GEMM adds itself to the LoRA term
        ctx.save_for_backward(xd2d, h, a, b, w_t)
        ctx.scale = scale
        ctx.same_input = xd is x
        ctx.x_shape, ctx.xd_shape = x.shape, xd.shape
        return out.view(*x.shape[:-1], w_t.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd2d, h, a, b, w_t = ctx.saved_tensors
        g = grad.reshape(-1, w_t.shape[1])  # (n, out)
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        gh = torch.mm(g, b)  # (n, r), scaled below
        if ctx.scale != 1.0:
            gh.mul_(ctx.scale)
        grad_a = torch.mm(gh.T, xd2d) if need_a else None  # (r, in)
        grad_b = None
        if need_b:
            grad_b = torch.mm(g.T, h)  # (out, r)
            if ctx.scale != 1.0:
                grad_b.mul_(ctx.scale)  # (out, r): the small side
        grad_x = grad_xd = None
        if ctx.same_input:
            if need_x:  # one buffer: the adapter's input gradient accumulates into g W
                grad_x = torch.mm(gh, a).addmm_(g, w_t.T).view(ctx.x_shape)
        else:
            if need_x:
                grad_x = torch.mm(g, w_t.T).view(ctx.x_shape)
            if need_xd:
                grad_xd = torch.mm(gh, a).view(ctx.xd_shape)
        return grad_x, grad_xd, grad_a, grad_b, None, None, None


def lora_plus_bias(h: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h (s B)^T + bias as (n, out), the bias added after the product (not as addmm's C).

    A mixed batch adds its per-group products onto the bias; adding the bias after the GEMM
    here rounds the same way, so each row of a mixed batch equals its single-adapter run.
    """
    out = torch.mm(h, b_t)
    return out if bias is None else out.add_(bias)
