"""NF4 from the QLoRA paper (Dettmers et al., 2023), in float64; never imported by src/."""

from __future__ import annotations

import torch

PAPER_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NF4 values as printed in the paper's appendix."""

OFFSET = 0.9677083
"""The paper's quantile offset: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, so that 0 is exact and
both ends reach +-1."""


def nf4_from_quantiles() -> torch.Tensor:
    """NF4 built as the paper describes: 8 positive and 7 negative quantiles of N(0, 1), an
    exact zero, normalized to [-1, 1]."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    positive = normal.icdf(torch.linspace(OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = values.sort().values
    return values / values.abs().max()


def max_half_gap(code: torch.Tensor) -> float:
    """Half the largest distance between neighbouring code values: the worst rounding error of
    a value in [-1, 1] rounded to the nearest code value."""
    values = code.double().sort().values
    return float((values[1:] - values[:-1]).max() / 2)


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block absolute maximum of the flattened tensor (the last block may be short)."""
    flat = x.double().reshape(-1)
    return torch.stack([b.abs().max() for b in flat.split(blocksize)])
