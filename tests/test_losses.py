"""The training loss: padding trim, loss-token count, and the blockwise head + cross-entropy
against the plain formula and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilpass import losses
from tilpass.losses import IGNORE_INDEX, count_loss_tokens, linear_cross_entropy, trim_padding


def inputs(
    dtype: torch.dtype, bias: bool, n: int = 7, hidden: int = 5, vocab: int = 11
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=gen).to(dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=gen).to(dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, b, y


@pytest.fixture(params=[1 << 22, 33], ids=["one-block", "blocks-of-3-rows"])
def block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run each test with one block and with several (the last one short)."""
    monkeypatch.setattr(losses, "BLOCK_LOGITS", request.param)
    return int(request.param)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias: bool, block: int) -> None:
    h, w, b, y = inputs(torch.float64, bias)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, b, y), (h, w, b))


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_cross_entropy_of_the_full_logits(
    dtype: torch.dtype, tol: float, bias: bool, block: int
) -> None:
    h, w, b, y = inputs(dtype, bias)
    loss = linear_cross_entropy(h, w, b, y)
    loss.backward()
    got = [loss.detach()] + [t.grad for t in (h, w, b) if t is not None]

    for t in (h, w, b):
        if t is not None:
            t.grad = None
    logits = F.linear(h, w, b).to(torch.promote_types(dtype, torch.float32))
    ref = F.cross_entropy(logits, y, reduction="sum")
    ref.backward()
    expected = [ref.detach()] + [t.grad for t in (h, w, b) if t is not None]
    for actual, wanted in zip(got, expected, strict=True):
        assert actual.dtype == wanted.dtype
        torch.testing.assert_close(actual, wanted, rtol=tol, atol=tol)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_computes_only_the_loss() -> None:
    h, w, b, y = inputs(torch.float64, True)
    w.requires_grad_(False)
    b.requires_grad_(False)
    linear_cross_entropy(h, w, b, y).backward()
    assert w.grad is None and b.grad is None and h.grad is not None
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, b, y)
    expected = F.cross_entropy(F.linear(h, w, b), y, reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_out_of_range_labels_are_named() -> None:
    h, w, b, y = inputs(torch.float32, False)
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 11\).*-100"):
        linear_cross_entropy(h, w, b, torch.full_like(y, -100))


def _padded_batch(extra: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows of 3 and 5 tokens, then ``extra`` all-padding columns."""
    width = 5 + extra
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, width), IGNORE_INDEX)
    for row, n in enumerate((3, 5)):
        ids[row, :n] = torch.arange(3, 3 + n)
        mask[row, :n] = 1
        labels[row, 1:n] = torch.arange(4, 3 + n)  # no loss on the first token
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_trim_padding_drops_only_all_pad_columns() -> None:
    tight = _padded_batch(0)
    trimmed = trim_padding(_padded_batch(3))
    assert trimmed.keys() == tight.keys()
    for key in tight:
        assert torch.equal(trimmed[key], tight[key]), key
    assert trim_padding(tight) is tight


def test_count_loss_tokens_counts_shifted_labels() -> None:
    # Targets are labels[:, 1:]: 2 in the 3-token row, 4 in the 5-token row.
    assert count_loss_tokens(_padded_batch(2)) == 6


def test_one_ignore_index_in_the_package() -> None:
    from tilpass import data

    assert IGNORE_INDEX == -100 and data.IGNORE_INDEX is IGNORE_INDEX
