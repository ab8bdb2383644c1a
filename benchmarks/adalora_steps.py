"""AdaLoRA's training step against a LoRA step of rank init_r and against PEFT's AdaLoRA step.

Part of `benchmarks/methods.py` (`--adalora-only` runs just this). Each step is what a training
loop does per optimizer step with the method: tilpass AdaLoRA = forward + orthogonality
regulariser, backward, importance scores (`after_backward`), AdamW, budget masking
(`on_step_end`); PEFT AdaLoRA = forward (its model adds the regulariser), backward, AdamW,
`update_and_allocate`; LoRA = forward, backward, AdamW. The schedule is in its budgeting phase
for every timed step (masking every step, deltaT = 1), the most expensive phase. The three
run interleaved in rounds in one process, on the same base model and batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from common import Gate, interleaved_rounds, median, per_round_ratio, timer

INIT_R, TARGET_R = 12, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULE = {"init_r": INIT_R, "target_r": TARGET_R, "tinit": 0, "tfinal": 0, "deltaT": 1}


class StepCounter:
    """The optimizer steps one variant has taken (its schedule position)."""

    def __init__(self) -> None:
        self.step = 0


def lora_step(base: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    import tilpass

    config = tilpass.LoraConfig(r=INIT_R, lora_alpha=INIT_R, target_modules=TARGETS)
    model = tilpass.get_peft_model(copy.deepcopy(base), config).train()
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tilpass_adalora_step(
    base: torch.nn.Module, ids: torch.Tensor, total: int
) -> Callable[[], None]:
    import tilpass
    from tilpass.methods.adalora import AdaLoraConfig
    from tilpass.train_hooks import TrainState

    config = AdaLoraConfig(target_modules=TARGETS, total_step=total, **SCHEDULE)
    model = tilpass.get_peft_model(copy.deepcopy(base), config).train()
    (hook,) = model.training_hooks()
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-4)
    at = StepCounter()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss + hook.loss_term(at.step)
        loss.backward()
        hook.after_backward(at.step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        at.step += 1
        hook.on_step_end(TrainState(at.step, total, 0, 0.0, 1e-4))

    return step


def peft_adalora_step(base: torch.nn.Module, ids: torch.Tensor, total: int) -> Callable[[], None]:
    import peft

    config = peft.AdaLoraConfig(
        target_modules=TARGETS, total_step=total, task_type="CAUSAL_LM", **SCHEDULE
    )
    model = peft.get_peft_model(copy.deepcopy(base), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    at = StepCounter()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(at.step)
        optimizer.zero_grad(set_to_none=True)
        at.step += 1

    return step


def adalora_steps(base: torch.nn.Module, vocab: int, rounds: int) -> dict[str, Any]:
    """Seconds per step of the three, interleaved; the ratios and the issue's gates."""
    ids = torch.randint(3, vocab, (4, 128))
    total = 10 * (rounds + 2)  # every timed step stays inside the budgeting phase
    steps = {
        "LoRA r=init_r": timer(lora_step(base, ids)),
        "tilpass AdaLoRA": timer(tilpass_adalora_step(base, ids, total)),
        "PEFT AdaLoRA": timer(peft_adalora_step(base, ids, total)),
    }
    seconds = interleaved_rounds(steps, rounds)
    vs_lora = per_round_ratio(seconds["tilpass AdaLoRA"], seconds["LoRA r=init_r"])
    vs_peft = per_round_ratio(seconds["tilpass AdaLoRA"], seconds["PEFT AdaLoRA"])
    gates = [
        Gate("AdaLoRA step / LoRA r=init_r step", vs_lora.median, 1.10, "<="),
        Gate("AdaLoRA step tilpass / PEFT", vs_peft.median, 1.0, "<="),
    ]
    return {"seconds": seconds, "vs_lora": vs_lora, "vs_peft": vs_peft, "gates": gates}


def print_adalora(result: dict[str, Any]) -> None:
    """The step times, the ratios and the gates."""
    seconds = result["seconds"]
    print("\nAdaLoRA training step (batch 4 x 128, init_r 12, all linear layers):")
    for name, series in seconds.items():
        print(f"  {name}: median {median(series):.4f} s over {len(series)} rounds")
    print(f"  tilpass AdaLoRA / LoRA r=init_r: {result['vs_lora']}")
    print(f"  tilpass AdaLoRA / PEFT AdaLoRA: {result['vs_peft']}")
    print("\n".join(g.line() for g in result["gates"]))
