"""Packing and length grouping: packed losses equal unpacked ones, runs and resumes are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import helpers
from tests.test_train import VOCAB, assert_same, cfg, collate, make_items, tiny_lora, trainable
from tilpass.data import LengthGroupedBatchSampler
from tilpass.data.packing import (
    Batching,
    BatchPlan,
    PackingError,
    check_packing,
    collate_packed,
    pack_rows,
    token_counts,
)
from tilpass.losses import causal_lm_loss
from tilpass.train import consumed_examples, epoch_batches, train
from tilpass.train_config import TrainConfig

PACKED = Batching(packing=True, max_length=32)
GROUPED = Batching(group_by_length=True)


def nonzero_b(model: nn.Module, seed: int = 1) -> nn.Module:
    """LoRA B non-zero, so the adapter changes the logits and a test cannot pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pack_rows_fills_rows_first_fit_decreasing_within_capacity() -> None:
    lengths = [5, 9, 3, 7, 2, 8]
    rows = pack_rows(lengths, 10)
    assert rows == [[1], [5, 4], [3, 2], [0]]
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert pack_rows([12, 3], 10) == [[0], [1]]  # too long: a row of its own
    assert pack_rows(lengths, 10) == rows  # deterministic


def test_collate_packed_restarts_positions_and_pads_as_its_own_block() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}  # its first label is no target, unpacked
    c = {"input_ids": [4], "labels": [4]}
    batch = collate_packed([[a, b], [c]], pad_token_id=0)
    expected = {
        "input_ids": [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]],
        "labels": [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]],
        "position_ids": [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]],
        "real_mask": [[True] * 5, [True] + [False] * 4],
    }
    assert {k: v.tolist() for k, v in batch.items()} == expected
    assert "attention_mask" not in batch  # transformers derives the blocks from position_ids
    assert token_counts(batch) == (6, 10)
    assert int((batch["labels"] != -100).sum()) == 3  # 6, 7 and 9: what the padded batch trains on
    with pytest.raises(ValueError, match="labels and input_ids differ"):
        collate_packed([[{"input_ids": [1, 2], "labels": [1]}]], 0)


def per_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy at every position of every row, (B, T-1), 0 where ignored."""
    kwargs = {k: v for k, v in batch.items() if k in ("attention_mask", "position_ids")}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    target = batch["labels"][:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none"
    )  # (B, T-1)
    return losses * (target != -100)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_gives_each_example_its_unpacked_losses(attn: str) -> None:
    model = nonzero_b(tiny_lora())
    model.get_base_model().config._attn_implementation = attn
    model.eval()
    items = make_items(6, seed=3)
    rows = pack_rows([len(x["input_ids"]) for x in items], 32)
    assert any(len(row) > 1 for row in rows)  # something is really packed
    packed = collate_packed([[items[i] for i in row] for row in rows], pad_token_id=0)
    with torch.no_grad():
        got = per_token_losses(model, packed)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(items[i]["input_ids"])
                alone = collate([items[i]])
                want = per_token_losses(model, {k: v[:, :n] for k, v in alone.items()})[0]
                # Positions at..at+n-2 predict the example's own tokens; the last one predicts
                # the next example's first token, which the example's labels never ask for.
                torch.testing.assert_close(got[r, at : at + n - 1], want, rtol=1e-5, atol=1e-6)
                at += n
        # The summed loss (what the trainer normalises by loss tokens) matches too.
        packed_loss, packed_n = causal_lm_loss(model, packed)
        padded_loss, padded_n = causal_lm_loss(model, collate(items))
    assert packed_n == padded_n
    torch.testing.assert_close(packed_loss / packed_n, padded_loss / padded_n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_runs_make_the_same_updates(tmp_path: Path, attn: str) -> None:
    items = make_items()
    c = cfg(max_steps=4, gradient_accumulation_steps=2, batch_size=3)
    padded, packed = nonzero_b(tiny_lora()), nonzero_b(tiny_lora())
    for model in (padded, packed):
        model.get_base_model().config._attn_implementation = attn
    train(padded, items, None, collate, c, tmp_path / "padded")
    train(packed, items, None, collate, c, tmp_path / "packed", batching=PACKED)
    assert packed.get_base_model().config._attn_implementation == attn  # left as it was
    torch.testing.assert_close(trainable(packed), trainable(padded), rtol=1e-4, atol=1e-6)
    pad_log = [e for e in events(tmp_path / "padded") if e["event"] == "train"]
    pack_log = [e for e in events(tmp_path / "packed") if e["event"] == "train"]
    for a, b in zip(pad_log, pack_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # The logged padding fraction is the micro-batches' own. On sdpa each micro-batch is one
    # padding-free row (attention per example); otherwise rows of max_length leave a little.
    plan = BatchPlan(items, collate, 3, c.seed, PACKED, flat=attn == "sdpa")
    first = plan.micro_batches(plan.epoch_batches(0)[:2])
    assert len(first) == 2 if attn == "sdpa" else len(first) == 1
    real, total = (sum(n) for n in zip(*map(token_counts, first), strict=True))
    assert pack_log[0]["padding_fraction"] == pytest.approx(1 - real / total)
    mean = [sum(e["padding_fraction"] for e in log) / 4 for log in (pad_log, pack_log)]
    assert mean[0] > mean[1] > 0.0 if attn == "eager" else mean[0] > mean[1] == 0.0


def test_a_resumed_packed_grouped_run_ends_bit_for_bit_like_a_straight_one(
    tmp_path: Path,
) -> None:
    items = make_items()
    both = Batching(packing=True, group_by_length=True, max_length=32)
    c = cfg(max_steps=6, save_steps=2)
    straight = nonzero_b(tiny_lora())
    train(straight, items, None, collate, c, tmp_path / "a", batching=both)
    resumed = nonzero_b(tiny_lora())
    train(resumed, items, None, collate, c, tmp_path / "b", callbacks=[_StopAt(4)], batching=both)
    resumed = nonzero_b(tiny_lora())
    lines: list[str] = []
    train(
        resumed,
        items,
        None,
        collate,
        c,
        tmp_path / "b",
        resume="auto",
        batching=both,
        log=lines.append,
    )
    assert lines == [f"resumed from {tmp_path / 'b' / 'checkpoint-4'} (step 4 of 6)"]
    assert_same(trainable(straight), trainable(resumed))
    # The grouped order is part of the data order: a run without it does not resume from it.
    with pytest.raises(ValueError, match="group_by_length"):
        train(tiny_lora(), items, None, collate, c, tmp_path / "b", resume="auto", log=lines.append)


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: object) -> None:
        state.should_stop = state.step >= self.step  # type: ignore[attr-defined]


def test_the_grouped_order_is_the_seeded_sampler_and_consumed_replays_it() -> None:
    items = make_items(10)
    lengths = [len(x["input_ids"]) for x in items]
    plan = BatchPlan(items, collate, 3, 7, GROUPED)
    sampler = LengthGroupedBatchSampler(lengths, 3, seed=7)
    sampler.set_epoch(1)
    assert plan.epoch_batches(1) == list(sampler) != plan.epoch_batches(0)
    assert plan.consumed(5, 1) == [
        i for b in plan.epoch_batches(0) + plan.epoch_batches(1)[:1] for i in b
    ]
    random_order = BatchPlan(items, collate, 3, 7)
    assert random_order.epoch_batches(2) == epoch_batches(10, 3, 7, 2)
    config = TrainConfig(batch_size=3, gradient_accumulation_steps=2, seed=7, max_steps=5)
    assert random_order.consumed(5, 2) == consumed_examples(10, 5, config)


class _NoBoundaries(nn.Module):
    """A causal LM that drops position ids: packed examples would attend to each other."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = helpers.tiny_llama(0, vocab_size=VOCAB)

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> object:
        return self.inner(input_ids=input_ids, use_cache=False)


def test_a_model_that_ignores_example_boundaries_is_refused_at_start_up(tmp_path: Path) -> None:
    items = make_items(4)
    with pytest.raises(PackingError, match=r"attention crosses example boundaries.*packing: false"):
        check_packing(_NoBoundaries(), items)
    with pytest.raises(PackingError, match="does not accept position_ids"):
        check_packing(nn.Sequential(nn.Embedding(VOCAB, 4)), items)  # type: ignore[arg-type]
    check_packing(nonzero_b(tiny_lora()), items)  # a transformers model passes
    with pytest.raises(PackingError):
        train(_NoBoundaries(), items, None, collate, cfg(max_steps=1), tmp_path, batching=PACKED)


def test_batching_describes_itself_for_the_banner() -> None:
    assert Batching().describe() == "batching: padded micro-batches (random order)"
    line = Batching(True, True, 512).describe()
    assert "packed (length-grouped order" in line
    assert "one padding-free row per micro-batch on sdpa models" in line
    assert "rows of up to 512 tokens" in line


def test_the_data_section_sets_the_batching_mode() -> None:
    from tilpass.cli import parse_overrides
    from tilpass.run import batching_of, build_config

    overrides = parse_overrides(["--data.packing", "true", "--data.max_length", "256"])
    config = build_config(overrides, "command line")
    assert batching_of(config.data) == Batching(packing=True, max_length=256)
    assert batching_of(build_config({}).data) == Batching()
    with pytest.raises(ValueError, match="group_by_length"):
        build_config({"data": {"group_by_length": "sometimes"}}, "run.yaml")
