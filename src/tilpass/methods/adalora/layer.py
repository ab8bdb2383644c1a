"""`AdaLoraLinear`: a LoRA layer whose update is kept in SVD form, P Lambda Q.

    y = base(x) + s * dropout(x) (Lambda P)^T Q^T,    s = lora_alpha / (init_r + 1e-5)

with P (r, in) = PEFT's `lora_A`, Lambda (r, 1) = `lora_E`, Q (out, r) = `lora_B`. As a LoRA
pair that is A = Lambda P, B = Q, so the layer is `LoraLinear` with `factors` returning that
pair: the fused path, merging and the batched mixed path (adapter_names per row) are LoRA's.
A pruned triplet has Lambda_i = 0; `rank_mask` records which are kept, and the file holds only
those rows (PEFT's format after `rank_pattern`).
"""

from __future__ import annotations

import torch
from torch import nn

from tilpass.layers import tensor_version
from tilpass.methods.adalora.config import AdaLoraSpec
from tilpass.methods.lora.layers import LoraLinear

INIT_STD = 0.02  # PEFT's N(0, 0.02) for P and Q


class AdaLoraLinear(LoraLinear):
    """AdaLoRA over a linear-like module (Linear, GPT-2's Conv1D, quantized linears)."""

    STORES = ("lora_A", "lora_B", "lora_E")
    STATUS_TYPE = "adalora.SVDLinear"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.lora_E = nn.ParameterDict()
        # Kept triplets per adapter, set by the rank allocator; absent = all kept.
        self.rank_mask: dict[str, torch.Tensor] = {}
        self._lambda_p: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def invalidate(self) -> None:
        super().invalidate()
        self._lambda_p.clear()

    def create(self, name: str, spec: AdaLoraSpec) -> None:
        """P, Q ~ N(0, 0.02) and Lambda = 0 (PEFT's init); all N(0, 1) for init=False."""
        kw = self.tensor_options()
        a = torch.empty(spec.r, self.in_features, **kw)
        e = torch.empty(spec.r, 1, **kw)
        b = torch.empty(self.out_features, spec.r, **kw)
        if spec.init is True:
            nn.init.normal_(a, std=INIT_STD)
            nn.init.normal_(b, std=INIT_STD)
            nn.init.zeros_(e)
        elif spec.init is False:  # random, as PEFT leaves them: tests only
            for t in (a, e, b):
                nn.init.normal_(t)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_E[name] = nn.Parameter(e)
        self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = spec

    def delete(self, name: str) -> None:
        super().delete(name)
        self.rank_mask.pop(name, None)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Lambda P, Q): the LoRA pair of the triplets. Without gradients the product is
        cached until P or Lambda changes, so LoRA's no-grad caches keep hitting."""
        p, e = self.lora_A._parameters[name], self.lora_E._parameters[name]
        q = self.lora_B._parameters[name]
        assert p is not None and e is not None and q is not None
        if torch.is_grad_enabled():
            return e * p, q  # (r, in)
        versions = (tensor_version(p), tensor_version(e))
        hit = self._lambda_p.get(name)
        if hit is None or hit[0] != versions or hit[1].dtype != p.dtype:
            with torch.inference_mode(False):  # a cache with a version counter
                hit = (versions, (e * p).detach())
            self._lambda_p[name] = hit
        return hit[1], q

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's keys (`lora_A`, `lora_B`, `lora_E`, no `.weight`); only the kept triplets
        when the allocator has pruned some (copies then, for saving)."""
        if name not in self.specs:
            return {}
        p, e, q = self.triplets(name)
        out = {"lora_A": p, "lora_B": q, "lora_E": e}
        mask = self.rank_mask.get(name)
        if mask is None or bool(mask.all()):
            return out
        keep = mask.to(out["lora_A"].device)
        return {
            "lora_A": out["lora_A"].detach()[keep],
            "lora_B": out["lora_B"].detach()[:, keep],
            "lora_E": out["lora_E"].detach()[keep],
        }

    def triplets(self, name: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """Adapter `name`'s (P, Lambda, Q) parameters, whole (for the allocator and regulariser)."""
        return self.lora_A[name], self.lora_E[name], self.lora_B[name]

    def kept_rank(self, name: str) -> int:
        """How many triplets of adapter `name` are kept (non-pruned)."""
        mask = self.rank_mask.get(name)
        return self.specs[name].r if mask is None else int(mask.sum())
