"""Float64 reference formulas for AdaLoRA, written from the paper, never imported by src/."""

from __future__ import annotations

import torch


def svd_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    p: torch.Tensor,
    e: torch.Tensor,
    q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """y = x W^T + b + scale * x (P^T diag(Lambda)) Q^T, with P (r, in), Lambda (r, 1),
    Q (out, r), W (out, in)."""
    x, w, p, e, q = (t.double() for t in (x, w, p, e, q))
    y = x @ w.T + scale * x @ p.T @ torch.diag(e.view(-1)) @ q.T
    return y if b is None else y + b.double()


def orth_penalty(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """mean over P and Q of ||P P^T - I||_F and ||Q^T Q - I||_F, one matrix at a time."""
    terms = []
    for p, q in pairs:
        for gram in (p @ p.T, q.T @ q):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            terms.append(torch.sqrt(((gram - eye) ** 2).sum()))
    return torch.stack(terms).mean()


def orth_penalty_grad_p(p: torch.Tensor, count: int) -> torch.Tensor:
    """d/dP of ||P P^T - I||_F / count: 2 (P P^T - I) P / (||P P^T - I||_F count)."""
    m = p @ p.T - torch.eye(p.shape[0], dtype=p.dtype)
    return 2 * m @ p / (torch.linalg.norm(m) * count)


def cubic_budget(step: int, init_b: int, target_b: int, tinit: int, tfinal: int, total: int) -> int:
    """The paper's schedule (Eq. 12), truncated to an integer."""
    if step <= tinit:
        return init_b
    if step > total - tfinal:
        return target_b
    return int(
        target_b + (init_b - target_b) * (1 - (step - tinit) / (total - tinit - tfinal)) ** 3
    )
