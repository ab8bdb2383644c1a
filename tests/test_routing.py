"""The batched mixed-adapter path against a slow per-token loop (punica-style)."""

from __future__ import annotations

import pytest
import torch

from tilpass.routing import Router, build_plan, grouped_b, grouped_lora

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}


def slow(x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One token at a time: x_i @ A_g^T @ B_g^T for the token's adapter g, zero for base."""
    rows = [
        x[i] @ a_t[g] @ b_t[g] if g >= 0 else x.new_zeros(b_t.shape[-1])
        for i, g in enumerate(ids.tolist())
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "row_ids",
    [[0, 1, 2, 0, 1, 2], [3, -1, 3, 0, 0, 0], [2, 2, 1, 1, 0, 0], [-1, 0, -1, -1, -1, -1]],
)
@pytest.mark.parametrize("tokens_per_row", [1, 3])
def test_grouped_lora_equals_per_token_loop(
    dtype: torch.dtype, row_ids: list[int], tokens_per_row: int
) -> None:
    torch.manual_seed(0)
    rows = torch.tensor(row_ids)
    n = len(row_ids) * tokens_per_row
    x = torch.randn(n, 8, dtype=dtype)
    a_t, b_t = torch.randn(4, 8, 3, dtype=dtype), torch.randn(4, 3, 5, dtype=dtype)
    plan = build_plan(rows, n, x.device)
    assert plan.single is None
    token_ids = rows.repeat_interleave(tokens_per_row)
    base = torch.randn(n, 5, dtype=dtype)
    out = grouped_lora(x, a_t, b_t, plan, base.clone())
    expected = base.double() + slow(x.double(), a_t.double(), b_t.double(), token_ids)
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    h = torch.randn(n, 3, dtype=dtype)
    eye = torch.eye(3, dtype=dtype).expand(4, 3, 3)
    out = grouped_b(h, b_t, plan, base.clone())
    expected = base.double() + slow(h.double(), eye.double(), b_t.double(), token_ids)
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype] * 10, rtol=TOL[dtype])


def test_plan_shapes() -> None:
    equal = build_plan(torch.tensor([0, 1, 0, 1]), 4, torch.device("cpu"))
    assert equal.mask is None and equal.index is not None and equal.index.shape == (2, 2)
    ragged = build_plan(torch.tensor([0, 0, 0, 1]), 8, torch.device("cpu"))
    assert ragged.index is not None and ragged.index.shape == (2, 6) and ragged.mask is not None
    assert int(ragged.mask.sum()) == 8
    assert build_plan(torch.tensor([2, 2]), 6, torch.device("cpu")).single == 2


def test_token_count_must_be_whole_rows() -> None:
    with pytest.raises(ValueError, match="3 entries but a layer saw 4 tokens"):
        build_plan(torch.tensor([0, 1, 0]), 4, torch.device("cpu"))


def test_router_plans_once_per_shape() -> None:
    router = Router()
    router.names = ["a", "b"]
    router.begin(router.ids_for(["a", "b", "__base__"]))
    first = router.plan(6, torch.device("cpu"))
    assert router.plan(6, torch.device("cpu")) is first
    router.end()
    assert router.row_ids is None
