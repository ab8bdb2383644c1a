"""The batched mixed-adapter path against a slow per-token loop (punica-style)."""

from __future__ import annotations

import threading

import pytest
import torch

from tilpass.errors import AdapterNameError
from tilpass.routing import (
    MIN_GROUP_ROWS,
    AdapterIds,
    Routing,
    build_plan,
    current_routing,
    grouped_b,
    grouped_lora,
    routed,
)

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
    assert plan.present is not None
    present = plan.present  # the stacks a layer passes hold the present adapters, in order
    out = grouped_lora(x, a_t[present], b_t[present], plan, base.clone())
    expected = base.double() + slow(x.double(), a_t.double(), b_t.double(), token_ids)
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    h = torch.randn(n, 3, dtype=dtype)
    eye = torch.eye(3, dtype=dtype).expand(4, 3, 3)
    out = grouped_b(h, b_t[present], plan, base.clone())
    expected = base.double() + slow(h.double(), eye.double(), b_t.double(), token_ids)
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype] * 10, rtol=TOL[dtype])


def test_plan_shapes() -> None:
    equal = build_plan(torch.tensor([0, 1, 0, 1]), 8, torch.device("cpu"))
    assert equal.mask is None and equal.index is not None and equal.index.shape == (2, 4)
    # groups get at least MIN_GROUP_ROWS slots (so BLAS rounds each row as in one GEMM)
    small = build_plan(torch.tensor([0, 1, 0, 1]), 4, torch.device("cpu"))
    assert small.index is not None and small.index.shape == (2, MIN_GROUP_ROWS)
    assert small.mask is not None and int(small.mask.sum()) == 4
    ragged = build_plan(torch.tensor([0, 0, 0, 1]), 8, torch.device("cpu"))
    assert ragged.index is not None and ragged.index.shape == (2, 6) and ragged.mask is not None
    assert int(ragged.mask.sum()) == 8
    assert build_plan(torch.tensor([2, 2]), 6, torch.device("cpu")).single == 2


def test_routing_plans_once_per_shape() -> None:
    ids = AdapterIds()
    ids.assign("a"), ids.assign("b")
    routing = Routing(ids.ids_for(["a", "b", "__base__"]))
    first = routing.plan(6, torch.device("cpu"))
    assert routing.plan(6, torch.device("cpu")) is first
    assert routing.plan(3, torch.device("cpu")) is not first


def test_ids_are_stable_when_an_adapter_is_deleted() -> None:
    ids = AdapterIds()
    a, b, c = ids.assign("a"), ids.assign("b"), ids.assign("c")
    ids.release("b")
    assert (ids["a"], ids["c"]) == (a, c) and "b" not in ids
    assert ids.assign("b") not in (a, b, c)  # never reused: a stale id cannot alias
    assert ids.ids_for(["c", "__base__", "a"]).tolist() == [c, -1, a]
    with pytest.raises(AdapterNameError, match="no loaded adapter's id"):
        ids.check(torch.tensor([b]))


def test_routing_is_scoped_to_its_block_and_thread() -> None:
    outer, inner = Routing(torch.tensor([0])), Routing(torch.tensor([1]))
    assert current_routing() is None
    seen: list[object] = []
    with routed(outer):
        with routed(inner):
            assert current_routing() is inner
        assert current_routing() is outer
        thread = threading.Thread(target=lambda: seen.append(current_routing()))
        thread.start()
        thread.join()
    assert current_routing() is None and seen == [None]


def test_per_token_ids_route_a_ragged_packed_batch() -> None:
    """Rows of different lengths packed end to end: each token follows its own id."""
    token_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1]])  # lengths 3, 5, 2 (base)
    plan = build_plan(token_ids, 10, torch.device("cpu"))
    assert plan.token_ids is not None and plan.token_ids.tolist() == token_ids[0].tolist()
    x = torch.randn(10, 8, dtype=torch.float64)
    a_t, b_t = torch.randn(2, 8, 3, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    out = grouped_lora(x, a_t, b_t, plan, torch.zeros(10, 5, dtype=torch.float64))
    torch.testing.assert_close(out, slow(x, a_t, b_t, token_ids[0]), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="per-token entries but a layer saw 9"):
        build_plan(token_ids, 9, torch.device("cpu"))


def test_plan_subset_keeps_only_the_named_adapters() -> None:
    plan = build_plan(torch.tensor([0, 1, 2, 0, -1, 2]), 6, torch.device("cpu"))
    sub = plan.subset((0, 2))
    assert sub is not None and sub.present is not None and sub.present.tolist() == [0, 2]
    assert plan.subset((0, 2)) is sub  # cached for the other layers
    assert plan.subset((5,)) is None
    assert plan.subset((0, 1, 2)) is plan


def test_token_count_must_be_whole_rows() -> None:
    with pytest.raises(ValueError, match="3 entries but a layer saw 4 tokens"):
        build_plan(torch.tensor([0, 1, 0]), 4, torch.device("cpu"))
