"""Tests for the training loop: accumulation, selective head, gradient flow, resume, outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tests import helpers
from tilpass.losses import causal_lm_loss, selective_loss_matches
from tilpass.train import (
    GradientFlowError,
    TrainConfig,
    TrainState,
    epoch_batches,
    lr_factor,
    train,
)
from tilpass.train_checkpoints import list_checkpoints, load_trainable

VOCAB = 48
PAD = 0


def peft_api() -> tuple[Any, Any]:
    """tilpass's core when it exists, else Hugging Face PEFT (same API)."""
    try:
        import tilpass

        return tilpass.get_peft_model, tilpass.LoraConfig
    except (ImportError, AttributeError):
        import peft

        return peft.get_peft_model, peft.LoraConfig


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return helpers.tiny_llama(seed, dtype, vocab_size=VOCAB).train()


def tiny_lora(
    seed: int = 0,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> nn.Module:
    get_peft_model, lora_config = peft_api()
    base = tiny_llama(seed, dtype)
    cfg = lora_config(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets))
    return get_peft_model(base, cfg)


def make_items(n: int = 24, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return items


def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(x["input_ids"]) for x in items) + 2  # extra padding: trimmed by the loop
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(x["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "learning_rate": 1e-2,
        "batch_size": 4,
        "max_steps": 4,
        "logging_steps": 1,
        "progress_bar": False,
        "warmup_steps": 1,
    }
    return TrainConfig(**{**base, **kw})


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- pure helpers


def test_lr_schedules() -> None:
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "linear") == pytest.approx(0.0)


def test_epoch_batches_deterministic_permutation() -> None:
    a = epoch_batches(10, 3, seed=1, epoch=0)
    assert a == epoch_batches(10, 3, seed=1, epoch=0)
    assert a != epoch_batches(10, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert [len(b) for b in a] == [3, 3, 3, 1]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="step").validate()
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"lr": 1.0})
    assert TrainConfig.__dataclass_fields__["seed"].metadata["help"]
    parsed = TrainConfig.from_dict({"learning_rate": "1e-3", "max_steps": "5", "num_epochs": 2})
    assert (parsed.learning_rate, parsed.max_steps, parsed.num_epochs) == (1e-3, 5, 2.0)
    with pytest.raises(ValueError, match="learning_rate: expected float, got 'fast'"):
        TrainConfig(learning_rate="fast")


# ------------------------------------------------------------------------------ numerics


def test_accumulation_equals_big_batch(tmp_path: Path) -> None:
    items = make_items(24)
    runs = []
    for bs, accum in ((2, 4), (8, 1)):
        model = tiny_lora(dtype=torch.float64)
        c = cfg(batch_size=bs, gradient_accumulation_steps=accum, max_steps=3, max_grad_norm=0.5)
        train(model, items, None, collate, c, tmp_path / f"run{bs}")
        runs.append(trainable(model))
    assert_same(runs[0], runs[1], atol=1e-10)
    assert any(
        not torch.equal(v, tiny_lora(dtype=torch.float64).state_dict()[k])
        for k, v in runs[0].items()
        if "lora_B" in k
    )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_selective_loss_equals_full_logits(kind: str) -> None:
    model = tiny_lora(dtype=torch.float64) if kind == "lora" else tiny_llama(dtype=torch.float64)
    with torch.no_grad():  # B != 0, so every LoRA parameter gets a non-zero gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = collate(make_items(6, seed=3))
    results = []
    for selective in (True, False):
        model.zero_grad()
        loss, n_tok = causal_lm_loss(model, batch, selective=selective)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), n_tok, grads))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-10, atol=1e-12, msg=name)
    # Same as transformers' own mean loss (which it computes in float32).
    ref = model(**batch).loss.detach().double()
    torch.testing.assert_close(l1 / n1, ref, rtol=1e-6, atol=1e-6)
    assert selective_loss_matches(model, batch)


class _ScaledLogits(nn.Module):
    """A wrapper whose forward does more than decoder + head (like logit soft-capping)."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner

    def get_base_model(self) -> LlamaForCausalLM:
        return self.inner

    def forward(self, **kw: Any) -> torch.Tensor:
        return 3.0 * self.inner(**kw).logits


def test_selective_check_rejects_non_equivalent_wrapper() -> None:
    assert not selective_loss_matches(_ScaledLogits(tiny_llama()), collate(make_items(4)))


# ---------------------------------------------------------------------- gradient flow


def test_gradient_checkpointing_same_result(tmp_path: Path) -> None:
    results = []
    for gc in (False, True):
        model = tiny_lora(dtype=torch.float64)
        c = cfg(gradient_checkpointing=gc)
        train(model, make_items(), None, collate, c, tmp_path / str(gc))
        results.append(trainable(model))
    assert_same(results[0], results[1], atol=1e-10)
    assert model.get_base_model().is_activation_checkpointing


def test_unused_trainable_parameter_is_named(tmp_path: Path) -> None:
    model = tiny_lora()
    model.unused_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(GradientFlowError, match="unused_scale"):
        train(model, make_items(), None, collate, cfg(), tmp_path)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_with_frozen_inputs_is_caught(tmp_path: Path) -> None:
    # The classic bug: reentrant checkpointing cuts the graph when no input requires grad,
    # so LoRA inside the checkpointed layers never trains (only lm_head's LoRA would).
    model = tiny_lora(targets=("q_proj", "v_proj", "lm_head"))
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()
    with pytest.raises(GradientFlowError, match="q_proj"):
        train(model, make_items(), None, collate, cfg(), tmp_path)


# ------------------------------------------------------------------- outputs and resume


def test_outputs_checkpoints_and_metrics(tmp_path: Path) -> None:
    model = tiny_lora(dropout=0.1)
    items = make_items()
    seen: list[dict[str, Any]] = []

    class Recorder:
        def on_log(self, event: dict[str, Any]) -> None:
            seen.append(event)

    c = cfg(max_steps=6, save_steps=2, save_total_limit=2, eval_steps=3)
    result = train(model, items, items[:8], collate, c, tmp_path, callbacks=[Recorder()])
    assert result.global_step == 6
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert result.checkpoint_dir == tmp_path / "checkpoint-6"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    log = events(tmp_path)
    assert log == seen
    assert [e["step"] for e in log if e["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [e for e in log if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert result.eval_metrics["eval_loss"] == evals[-1]["eval_loss"]
    train_event = next(e for e in log if e["event"] == "train")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert train_event[key] > 0, key
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoint tensors are keyed by parameter name and load back strictly.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    load_trainable(tmp_path / "checkpoint-6", named)
    other = tiny_lora(targets=("q_proj",))
    with pytest.raises(ValueError, match="unexpected"):
        load_trainable(
            tmp_path / "checkpoint-6",
            [(n, p) for n, p in other.named_parameters() if p.requires_grad],
        )


def test_full_finetuning_reduces_loss(tmp_path: Path) -> None:
    model = tiny_llama()
    items = make_items(8)
    c = cfg(max_steps=15, batch_size=8, learning_rate=3e-3, lr_scheduler="constant")
    result = train(model, items, items, collate, c, tmp_path)
    losses = [e["loss"] for e in events(tmp_path) if e["event"] == "train"]
    assert losses[-1] < 0.7 * losses[0]
    assert result.eval_metrics["eval_loss"] < losses[0]


def test_early_stopping(tmp_path: Path) -> None:
    items = make_items(16)
    # A threshold no decrease can meet: every eval after the first counts as no improvement.
    c = cfg(max_steps=20, eval_steps=1, early_stopping_patience=2, early_stopping_threshold=10.0)
    result = train(tiny_lora(), items, items[:4], collate, c, tmp_path)
    assert result.stopped_early and result.global_step == 3
    assert any(e["event"] == "early_stop" for e in events(tmp_path))


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: TrainState) -> None:
        state.should_stop = state.step >= self.step


def test_resume_in_process_matches_uninterrupted(tmp_path: Path) -> None:
    items = make_items(28)  # 7 batches of 4, accumulation 2: 4 steps per epoch (ragged end)
    c = cfg(max_steps=6, save_steps=3, gradient_accumulation_steps=2, max_grad_norm=1.0)
    straight = tiny_lora(dropout=0.1)
    train(straight, items, items[:4], collate, c, tmp_path / "a")

    first = tiny_lora(dropout=0.1)
    train(first, items, items[:4], collate, c, tmp_path / "b", callbacks=[_StopAt(3)])
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-3"]
    resumed = tiny_lora(dropout=0.1)
    result = train(resumed, items, items[:4], collate, c, tmp_path / "b", resume="auto")
    assert result.global_step == 6
    assert_same(trainable(straight), trainable(resumed))
    steps = [e["step"] for e in events(tmp_path / "b") if e["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_rejects_changed_data_settings(tmp_path: Path) -> None:
    train(tiny_lora(), make_items(), None, collate, cfg(max_steps=2), tmp_path)
    with pytest.raises(ValueError, match="same data order"):
        train(tiny_lora(), make_items(), None, collate, cfg(batch_size=2), tmp_path, resume="auto")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(tiny_lora(), make_items(), None, collate, cfg(), tmp_path, resume=tmp_path / "nope")


_CRASH_SCRIPT = """
import os, sys
sys.path[:0] = [{src!r}, {tests!r}, os.path.dirname({tests!r})]
from test_train import cfg, collate, make_items, tiny_lora
from tilpass.train import train

class Crash:
    def on_step_end(self, state):
        if state.step == 5:
            os._exit(17)  # a hard crash: no cleanup, no final checkpoint

train(tiny_lora(dropout=0.1), make_items(), None, collate,
      cfg(max_steps=8, save_steps=2, save_total_limit=2), {out!r}, callbacks=[Crash()])
"""


@pytest.mark.slow
def test_resume_after_killed_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = tmp_path / "crash.py"
    src = str(Path(__file__).resolve().parents[1] / "src")
    tests = str(Path(__file__).resolve().parent)
    script.write_text(textwrap.dedent(_CRASH_SCRIPT.format(src=src, tests=tests, out=str(out))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    (out / "checkpoint-9").mkdir()  # incomplete: must be ignored by resume="auto"
    (out / ".checkpoint-6.tmp-12345").mkdir()  # debris of a crashed save: removed

    resumed = tiny_lora(dropout=0.1)
    c = cfg(max_steps=8, save_steps=2, save_total_limit=2)
    result = train(resumed, make_items(), None, collate, c, out, resume="auto")
    assert result.global_step == 8
    assert not (out / ".checkpoint-6.tmp-12345").exists()
    straight = tiny_lora(dropout=0.1)
    train(straight, make_items(), None, collate, c, tmp_path / "straight")
    assert_same(trainable(straight), trainable(resumed), atol=1e-6)
    steps = [e["step"] for e in events(out) if e["event"] == "train"]
    assert steps == list(range(1, 9))  # events of the lost step 5 were dropped


def test_with_data_module_and_generation_eval(tmp_path: Path, tiny_tokenizer: Any) -> None:
    from functools import partial

    from tilpass.data import build_dataset, load_records
    from tilpass.data import collate as data_collate

    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}? ", "completion": str(2 * i)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = build_dataset(path, tiny_tokenizer, max_length=64)
    records, _ = load_records(path)
    get_peft_model, lora_config = peft_api()
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tiny_tokenizer),
        )
    )
    model = get_peft_model(base, lora_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    coll = partial(data_collate, pad_token_id=tiny_tokenizer.pad_token_id)
    c = cfg(max_steps=2, eval_max_new_tokens=3, eval_generation_samples=4)
    result = train(model, dataset, dataset, coll, c, tmp_path / "out", tiny_tokenizer, records)
    ev = result.eval_metrics
    assert ev["exact_match_n"] == 4 and 0.0 <= ev["exact_match"] <= 1.0
    assert ev["examples"][0]["reference"] == "0" and ev["eval_tokens"] > 0


def test_consumed_examples_replays_the_data_order() -> None:
    from tilpass.train import TrainConfig, consumed_examples, epoch_batches

    config = TrainConfig(batch_size=4, gradient_accumulation_steps=1, seed=3)
    seen = consumed_examples(10, 4, config)  # 3 batches per epoch, then one of epoch 1
    assert sorted(seen[:10]) == list(range(10)) and len(seen) == 14
    assert seen[10:] == epoch_batches(10, 4, 3, 1)[0]
    accumulated = TrainConfig(batch_size=2, gradient_accumulation_steps=2, seed=3)
    assert len(consumed_examples(10, 3, accumulated)) == 10  # 5 micro-batches: 2 + 2 + 1


# ------------------------------------------------------------------------------- hooks


class _Hooked(nn.Module):
    """A stand-in for an adapter wrapper whose methods bring training hooks."""

    def __init__(self, inner: nn.Module, hooks: list[Any]) -> None:
        super().__init__()
        self.inner = inner
        self.hooks = hooks

    def get_base_model(self) -> nn.Module:
        return self.inner.get_base_model()

    def forward(self, **kw: Any) -> Any:
        return self.inner(**kw)

    def training_hooks(self) -> list[Any]:
        return self.hooks


class _L2OnLoraA:
    """A loss term on parameters only: weight * sum of squares of every lora_A matrix."""

    name = "l2"

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.params = [p for n, p in model.named_parameters() if "lora_A" in n]
        self.weight = weight
        self.calls: list[int] = []

    def loss_term(self, step: int) -> torch.Tensor:
        self.calls.append(step)
        return self.weight * sum(p.pow(2).sum() for p in self.params)


def test_loss_term_from_model_hooks_changes_training_and_is_logged(tmp_path: Path) -> None:
    items = make_items(16)
    c = cfg(max_steps=3, gradient_accumulation_steps=2, batch_size=2)
    plain = tiny_lora()
    train(plain, items, None, collate, c, tmp_path / "plain")
    inner = tiny_lora()
    initial_l2 = sum(
        float(p.detach().double().pow(2).sum())
        for n, p in inner.named_parameters()
        if "lora_A" in n
    )
    hook = _L2OnLoraA(inner, weight=0.5)
    train(_Hooked(inner, [hook]), items, None, collate, c, tmp_path / "hooked")

    assert hook.calls == [0, 0, 1, 1, 2, 2]  # after each micro-batch's forward
    lora_a = [n for n in trainable(plain) if "lora_A" in n]
    assert all(not torch.equal(trainable(inner)[n], trainable(plain)[n]) for n in lora_a)
    first_plain = next(e for e in events(tmp_path / "plain") if e["event"] == "train")
    first = next(e for e in events(tmp_path / "hooked") if e["event"] == "train")
    assert "loss_terms" not in first_plain
    # Step 1 starts from the same weights: same next-token loss, plus the term once.
    assert first["loss_terms"]["l2"] == pytest.approx(0.5 * initial_l2, rel=1e-6)
    assert first["loss"] == pytest.approx(first_plain["loss"] + 0.5 * initial_l2, rel=1e-6)


def test_loss_term_enters_once_per_step_whatever_the_accumulation(tmp_path: Path) -> None:
    items = make_items(24)
    runs = []
    for bs, accum in ((2, 4), (8, 1)):
        inner = tiny_lora(dtype=torch.float64)
        c = cfg(batch_size=bs, gradient_accumulation_steps=accum, max_steps=3, max_grad_norm=0.5)
        train(_Hooked(inner, [_L2OnLoraA(inner, 0.3)]), items, None, collate, c, tmp_path / str(bs))
        runs.append(trainable(inner))
    assert_same(runs[0], runs[1], atol=1e-10)


class _GradProbe:
    """Records, after backward, the step, whether every gradient exists, and the grad norm."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.seen: list[tuple[int, bool, float]] = []

    def after_backward(self, step: int) -> None:
        grads = [p.grad for p in self.params]
        ok = all(g is not None for g in grads)
        norm = float(
            torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None]))
        )
        self.seen.append((step, ok, norm))


def test_after_backward_once_per_step_with_gradients_before_clipping(tmp_path: Path) -> None:
    model = tiny_lora()
    probe = _GradProbe(model)
    c = cfg(max_steps=3, gradient_accumulation_steps=2, batch_size=2, max_grad_norm=1e-4)
    train(model, make_items(16), None, collate, c, tmp_path, callbacks=[probe])
    assert [s for s, _, _ in probe.seen] == [0, 1, 2]  # once per optimizer step, not per micro
    assert all(ok for _, ok, _ in probe.seen)
    logged = [e["grad_norm"] for e in events(tmp_path) if e["event"] == "train"]
    # The logged norm is the one before clipping; clipping to 1e-4 happened after the probe.
    assert [n for _, _, n in probe.seen] == pytest.approx(logged, rel=1e-5)
    assert min(logged) > 1e-2


class _FreezeByGradient:
    """Zeroes one parameter's gradient after backward: that parameter must not move."""

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param

    def after_backward(self, step: int) -> None:
        assert self.param.grad is not None
        self.param.grad.zero_()


def test_after_backward_can_modify_gradients(tmp_path: Path) -> None:
    inner = tiny_lora()
    # lora_A: zeroing a lora_B would also starve its lora_A (B stays 0), which the
    # gradient-flow check rightly reports.
    name, frozen = next((n, p) for n, p in inner.named_parameters() if "lora_A" in n)
    before = trainable(inner)
    train(_Hooked(inner, [_FreezeByGradient(frozen)]), make_items(), None, collate, cfg(), tmp_path)
    after = trainable(inner)
    assert torch.equal(after[name], before[name])
    moved = [n for n in before if "lora_A" in n and not torch.equal(after[n], before[n])]
    assert len(moved) == len([n for n in before if "lora_A" in n]) - 1


def test_loss_term_must_be_a_scalar(tmp_path: Path) -> None:
    class Bad:
        name = "vector"

        def loss_term(self, step: int) -> torch.Tensor:
            return torch.ones(3)

    with pytest.raises(TypeError, match="'vector': loss_term"):
        train(tiny_lora(), make_items(), None, collate, cfg(), tmp_path, callbacks=[Bad()])
