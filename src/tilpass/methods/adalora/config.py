"""`AdaLoraConfig`: AdaLoRA's settings, with PEFT's field names, meanings and validation."""

from __future__ import annotations

import dataclasses
import warnings

from tilpass.config import TargetedConfig
from tilpass.config_fields import opt
from tilpass.methods.lora.layers import AdapterSpec

RANKNUM_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5); kept so logits match its own


@dataclasses.dataclass(frozen=True)
class AdaLoraSpec(AdapterSpec):
    """One AdaLoRA adapter's settings in one layer: `r` is the number of triplets the layer
    holds (fewer than `init_r` once a pruned file is loaded), `ranknum` the initial rank the
    update is divided by (PEFT's `ranknum`, which pruning never changes)."""

    ranknum: float = 0.0

    @property
    def scale(self) -> float:
        """PEFT's factor: lora_alpha / (ranknum + 1e-5) (r instead of alpha when alpha <= 0)."""
        numerator = self.alpha if self.alpha > 0 else float(self.r)
        return numerator / (self.ranknum + RANKNUM_EPS)


@dataclasses.dataclass
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA settings, with PEFT's field names and meanings.

    Training has three phases: `tinit` warm-up steps at the full budget (`init_r` triplets per
    module), a cubic decrease of the total budget to `target_r` per module until step
    `total_step - tfinal`, and `tfinal` steps that fine-tune the final ranks.

    Attributes:
        init_r / target_r: the initial rank of each module, and the average final rank.
        tinit / tfinal / deltaT: warm-up steps, final fine-tuning steps, steps between two
            budget allocations.
        beta1 / beta2: EMA factors of the sensitivity smoothing and the uncertainty term.
        orth_reg_weight: weight of the orthogonality regulariser on P and Q.
        total_step: the run's optimizer steps; None in a YAML file = the run's step plan.
        rank_pattern: the allocator's result, {"<module>.lora_E": [kept, ...]} per module.
        r: PEFT's LoRA rank field, unused by AdaLoRA (kept so PEFT's files round-trip).
    """

    PEFT_TYPE = "ADALORA"
    # rank_pattern holds the allocator's masks under "<module>.lora_E" keys, not patterns
    MODULE_PATTERN_FIELDS = ()

    init_r: int = opt(12, "Initial rank (triplets) of every module.")
    target_r: int = opt(8, "Target average rank per module after the budget schedule.")
    tinit: int = opt(0, "Warm-up steps at the full budget before pruning starts.")
    tfinal: int = opt(0, "Final steps that fine-tune the final ranks (no more pruning).")
    deltaT: int = opt(1, "Steps between two budget allocations.")
    beta1: float = opt(0.85, "EMA factor of the sensitivity smoothing, in (0, 1).")
    beta2: float = opt(0.85, "EMA factor of the uncertainty term, in (0, 1).")
    orth_reg_weight: float = opt(0.5, "Weight of the orthogonality regulariser (>= 0).")
    total_step: int | None = opt(None, "Total optimizer steps; unset = the run's step plan.")
    rank_pattern: dict[str, list[bool]] | None = opt(
        None, "Kept triplets per module, written by the rank allocator."
    )
    lora_alpha: float = opt(8, "Scale numerator: the update is scaled by lora_alpha / init_r.")
    lora_dropout: float = opt(0.0, "Dropout on the adapter branch input, in [0, 1).")
    init_lora_weights: bool = opt(
        True, "True: P, Q ~ N(0, 0.02), Lambda = 0; False: all random (tests only)."
    )
    bias: str = opt("none", "Which biases train: only 'none' is supported.")
    r: int = opt(8, "Unused by AdaLoRA (use init_r); kept for PEFT's files.")
    layers_to_transform: list[int] | int | None = opt(
        None, "Only these layer indices (with layers_pattern naming the layer list)."
    )
    layers_pattern: list[str] | str | None = opt(
        None, "Name of the module list that holds the layers (e.g. layers, h)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.init_r, "init_r")
        _positive_int(self.target_r, "target_r")
        _positive_int(self.deltaT, "deltaT")
        _check(
            self.target_r <= self.init_r,
            f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): the budget "
            "only shrinks",
        )
        for field in ("tinit", "tfinal"):
            value = getattr(self, field)
            _check(
                isinstance(value, int) and value >= 0, f"{field} must be an int >= 0, got {value!r}"
            )
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            _check(0 < value < 1, f"{field} must be in (0, 1), got {value!r}")
        _check(
            self.orth_reg_weight >= 0,
            f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}",
        )
        _check(
            0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}"
        )
        if self.bias != "none":
            raise NotImplementedError(f"bias={self.bias!r} is not supported; use bias='none'")
        if self.total_step is not None:
            self.check_steps(self.total_step, "total_step")
        self._check_rank_pattern()
        if self.r != 8:
            warnings.warn("AdaLoRA does not use r; set the initial rank with init_r", stacklevel=3)

    def check_steps(self, total_step: int, source: str) -> None:
        """Raise unless `total_step` leaves a budgeting phase after `tinit` and before `tfinal`."""
        _check(
            isinstance(total_step, int) and total_step > 0,
            f"{source} must be a positive integer, got {total_step!r}",
        )
        _check(
            self.tinit + self.tfinal < total_step,
            f"tinit ({self.tinit}) + tfinal ({self.tfinal}) >= total_step ({total_step}, "
            f"{source}): no step is left to prune ranks; lower tinit / tfinal or train longer",
        )

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        _check(isinstance(self.rank_pattern, dict), "rank_pattern must be a dict or null")
        for key, mask in self.rank_pattern.items():
            _check(
                isinstance(mask, list) and all(v in (0, 1) for v in mask),
                f"rank_pattern[{key!r}] must be a list of booleans (kept triplets), got {mask!r}",
            )

    def kept_rank(self, module_name: str) -> int:
        """The number of triplets module `module_name` holds: its rank_pattern entry's kept
        count (a pruned file stores only those), else init_r."""
        mask = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return self.init_r if mask is None else sum(bool(v) for v in mask)

    def layer_spec(self, module_name: str, initialize: bool) -> AdaLoraSpec:
        """The adapter settings for module `module_name` (its kept rank; the shared scale)."""
        return AdaLoraSpec(
            r=self.kept_rank(module_name),
            alpha=float(self.lora_alpha),
            dropout=self.lora_dropout,
            init=self.init_lora_weights if initialize else None,
            ranknum=float(self.init_r),
        )


def _positive_int(value: object, name: str) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
