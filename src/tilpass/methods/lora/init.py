"""LoRA initialisations that read the base weight (PiSSA, OLoRA) or build B A = 0 with both
factors non-zero (orthogonal), with PEFT's meanings.

For W (out, in), rank r and scale s:

- "pissa": W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A is W's rank-r
  principal part. "pissa_niter_K" takes the SVD from `torch.svd_lowrank` with K iterations.
- "olora": W = Q R; A = R[:r], B = Q[:, :r].
- PiSSA and OLoRA then replace W by the residual W - s B A, so the adapted layer starts out
  equal to the base layer. This changes the base weight in place, as PEFT does; it is the one
  case where adding an adapter edits the base model, and only when the caller asks for it.
- "orthogonal": one random r x r rotation Q; A = (randn(in, r/2) Q_odd)^T / 10 and
  B = randn(out, r/2) Q_even / 10, so B A = 0 (Q's rows are orthonormal) with A and B random.
"""

from __future__ import annotations

import re
from typing import Any

import torch

PLAIN_INITS = (True, False, "gaussian")
WEIGHT_INITS = ("pissa", "olora", "orthogonal")
NITER = re.compile(r"pissa_niter_(\d+)")


def canonical_init(value: Any) -> Any:
    """`init_lora_weights` as the layers read it: PEFT compares "olora" and "gaussian" without
    regard to case ("OLoRA" works), so those are lower-cased; anything else is unchanged."""
    if isinstance(value, str) and value.lower() in ("olora", "gaussian"):
        return value.lower()
    return value


def mutates_base(value: Any) -> bool:
    """True for the initialisations that replace the base weight by a residual (PiSSA, OLoRA):
    loading such an adapter recomputes that residual, as PEFT does, or its output would be
    the unmodified base plus the trained update."""
    value = canonical_init(value)
    return isinstance(value, str) and (value == "olora" or value.startswith("pissa"))


def check_init(value: Any) -> None:
    """Raise ValueError unless `value` is an `init_lora_weights` tilpass implements."""
    value = canonical_init(value)
    if value in PLAIN_INITS or value in WEIGHT_INITS:
        return
    if isinstance(value, str) and NITER.fullmatch(value):
        return
    raise ValueError(
        "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' "
        f"(K iterations, e.g. 'pissa_niter_4'), 'olora' or 'orthogonal'; got {value!r}"
    )


def reads_weight(value: Any) -> bool:
    """True for the initialisations that need the base weight (and so a Linear layer)."""
    return isinstance(value, str) and value != "gaussian"


@torch.no_grad()
def weight_init(
    value: str, weight: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, B, residual W or None) for `value` from the base weight `weight` (out, in).

    Computed in float32 (PEFT's precision); the caller casts to the adapter's dtype.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(
            f"init_lora_weights={value!r} needs a floating-point base weight, got {weight.dtype}; "
            "initialise before quantizing the base model"
        )
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    if value == "orthogonal":
        a, b = _orthogonal(r, w.shape[1], w.shape[0])
        return a, b, None
    if value == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        a, b = _pissa(value, w, r, scale)
    return a, b, w - scale * (b @ a)


def _pissa(value: str, w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    found = NITER.fullmatch(value)
    if found is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=int(found.group(1)))
        vh = v.T
    root = torch.sqrt(s / scale)
    return (root.unsqueeze(1) * vh).contiguous(), (u * root.unsqueeze(0)).contiguous()


def _orthogonal(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    if r % 2:
        raise ValueError(
            f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead "
            "(init_lora_weights='orthogonal' splits one rotation into halves for A and B)"
        )
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(in_features, r // 2).mm(q[0::2]).T / 10.0  # (r, in)
    b = torch.randn(r // 2, out_features).T.mm(q[1::2]) / 10.0  # (out, r)
    return a.contiguous(), b.contiguous()
