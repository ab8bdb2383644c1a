"""What `tilpass compare` runs: the methods, their documented default settings, the budget.

Each row of the comparison is a `MethodPlan`: a label the user types (`--methods lora,ia3`),
the registered method it trains (or `full`), that method's settings, a learning rate for a
short budget, and whether the base is quantized (QLoRA is LoRA over an NF4 base). The table
`DEFAULTS` is the one place these numbers live; `docs/compare.md` prints it. A label whose
method is not registered in this version (the registry decides, not this file) becomes a row
marked "not available in this version" instead of an error, so a method joins the
comparison as soon as it is registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tilpass.errors import TilpassError

FULL = "full"
"""The run method that trains every parameter (`tilpass.run_config.FULL`)."""

ATTENTION = ["q_proj", "v_proj"]
"""LoRA-style targets of the defaults: the attention's query and value projections."""

UNAVAILABLE = "not available in this version"


class CompareError(TilpassError, ValueError):
    """A `tilpass compare` request that cannot be run (unknown method, bad budget)."""


@dataclass(frozen=True)
class MethodPlan:
    """One row of the comparison: which method trains, with which settings.

    Attributes:
        label: the row's name (`qlora`, `houlsby`).
        method: the registered method trained (`lora`, `bottleneck`) or `full`.
        settings: the method's config section (`tilpass train`'s `lora:` keys).
        learning_rate: the peak learning rate for the comparison's short budget.
        quantize: the base's format (`nf4` for QLoRA), or None.
        merged_row: also measure inference with the adapter merged into the base.
        needs_total_step: the config takes the run's step count as `total_step` (AdaLoRA).
    """

    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 2e-3
    quantize: str | None = None
    merged_row: bool = False
    needs_total_step: bool = False


_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ATTENTION}

DEFAULTS: dict[str, MethodPlan] = {
    plan.label: plan
    for plan in (
        MethodPlan("lora", "lora", _LORA, 2e-3, merged_row=True),
        MethodPlan("qlora", "lora", _LORA, 2e-3, quantize="nf4"),
        MethodPlan("dora", "lora", {**_LORA, "use_dora": True}, 2e-3, merged_row=True),
        MethodPlan("ia3", "ia3", {}, 1e-2),
        MethodPlan(
            "adalora",
            "adalora",
            {"init_r": 12, "target_r": 8, "lora_alpha": 16, "target_modules": ATTENTION},
            1e-2,
            needs_total_step=True,
        ),
        MethodPlan("houlsby", "bottleneck", {"placement": "houlsby", "bottleneck_size": 32}, 1e-3),
        MethodPlan(
            "pfeiffer", "bottleneck", {"placement": "pfeiffer", "bottleneck_size": 32}, 1e-3
        ),
        MethodPlan("prompt", "prompt_tuning", {"num_virtual_tokens": 16}, 3e-2),
        MethodPlan("lora+prompt", "lora+prompt", {**_LORA, "num_virtual_tokens": 16}, 2e-3),
        MethodPlan(FULL, FULL, {}, 5e-5),
    )
}
"""Every method `tilpass compare` knows, with its documented defaults, in table order."""

DEFAULT_METHODS = tuple(DEFAULTS)


@dataclass(frozen=True)
class Budget:
    """The training budget every method gets: optimizer steps, or minutes of training each."""

    steps: int = 0
    minutes: float = 0.0

    def __post_init__(self) -> None:
        if (self.steps > 0) == (self.minutes > 0):
            raise CompareError("give exactly one budget: --budget-steps N or --budget-minutes N")

    def describe(self) -> str:
        """The budget as the report states it."""
        if self.steps:
            return f"{self.steps} optimizer steps per method"
        return f"{self.minutes:g} minutes of training per method"


def parse_methods(text: str) -> list[str]:
    """`--methods lora,ia3` as labels; unknown labels are an error listing the known ones."""
    labels = [name.strip() for name in text.split(",") if name.strip()]
    if not labels:
        raise CompareError("--methods: give at least one method, e.g. --methods lora,ia3")
    unknown = [name for name in labels if name not in DEFAULTS]
    if unknown:
        raise CompareError(
            f"--methods: unknown method(s) {', '.join(unknown)}; choose from "
            f"{', '.join(DEFAULT_METHODS)}"
        )
    return list(dict.fromkeys(labels))


def is_available(plan: MethodPlan) -> bool:
    """Whether this version of tilpass can train the plan's method (the registry decides)."""
    from tilpass.methods import METHODS

    return plan.method == FULL or plan.method in METHODS


def run_values(plan: MethodPlan, steps: int) -> dict[str, Any]:
    """The plan's part of a `tilpass train` config: method, its section, quantize, rate."""
    values: dict[str, Any] = {"method": plan.method}
    if plan.quantize is not None:
        values["quantize"] = plan.quantize
    if plan.method != FULL:
        settings = dict(plan.settings)
        if plan.needs_total_step:  # AdaLoRA: warm up, prune, then fine-tune the final ranks
            settings["total_step"] = steps
            settings.setdefault("tinit", steps // 5)
            settings.setdefault("tfinal", steps // 5)
        values[plan.method] = settings
    values["training"] = {"learning_rate": plan.learning_rate}
    return values
