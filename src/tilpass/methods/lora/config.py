"""`LoraConfig`: LoRA's settings, with PEFT's field names, meanings and validation."""

from __future__ import annotations

import dataclasses
import warnings

from tilpass.config import AdapterConfig


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings, with PEFT's field names and meanings.

    Attributes:
        r: rank of the update.
        lora_alpha: scale numerator; the update is scaled by alpha / r.
        lora_dropout: dropout on the layer input of the LoRA branch, in [0, 1).
        target_modules: module names (exact or dotted suffix), a regex matched against the
            full name, or "all-linear" (every Linear/Conv1D except the output head).
        exclude_modules: names or regex to leave out, same matching as target_modules.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (Linear and Conv1D).
        init_lora_weights: True = Kaiming A and zero B; "gaussian" = N(0, 1/r) A and zero B;
            False = both random (only for tests: the adapter changes the model from step 0).
        rank_pattern / alpha_pattern: per-module overrides, keys matched like target_modules.
    """

    PEFT_TYPE = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        _check(
            isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}"
        )
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(
            0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}"
        )
        _check(
            self.init_lora_weights in (True, False, "gaussian"),
            f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}",
        )
        if self.bias != "none":
            raise NotImplementedError(
                f"bias={self.bias!r} is not supported by tilpass yet; use bias='none' "
                "(the base biases stay frozen)"
            )
        for key, value in self.rank_pattern.items():
            _check(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}] must be > 0")
        for key, value in self.alpha_pattern.items():
            _check(value > 0, f"alpha_pattern[{key!r}] must be > 0")
        if self.r < 4 or any(v < 4 for v in self.rank_pattern.values()):
            warnings.warn(
                f"LoRA rank r={self.r} is very low: ranks of 1-2 tend to underfit; "
                "r=8 is a good start",
                stacklevel=3,
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
