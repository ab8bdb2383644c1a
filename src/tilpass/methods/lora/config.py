"""`LoraConfig`: LoRA's settings, with PEFT's field names, meanings and validation."""

from __future__ import annotations

import dataclasses
import re
import warnings
from functools import partial
from typing import Any

from tilpass.config import TargetedConfig
from tilpass.config_fields import opt
from tilpass.methods.lora.dora import DORA
from tilpass.methods.lora.init import check_init
from tilpass.methods.lora.layers import AdapterSpec
from tilpass.methods.lora.parameter import for_parameters, parameter_owners
from tilpass.methods.lora.trainable_tokens import TokenSpec, TrainableTokens, token_targets
from tilpass.methods.lora.unsupported import RESEARCH_FIELDS, check_supported

LOW_RANK = 4
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclasses.dataclass
class LoraConfig(TargetedConfig):
    """LoRA settings, with PEFT's field names and meanings.

    Attributes:
        r: rank of the update.
        lora_alpha: scale numerator; the update is scaled by alpha / r.
        lora_dropout: dropout on the layer input of the LoRA branch, in [0, 1).
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (Linear and Conv1D).
        init_lora_weights: True = Kaiming A and zero B; "gaussian" = N(0, 1/r) A and zero B;
            False = both random (only for tests: the adapter changes the model from step 0);
            "pissa" / "pissa_niter_K" / "olora" = A, B from the base weight's SVD / QR, with
            the base weight replaced by its residual (as PEFT does); "orthogonal" = A, B from
            orthogonal halves of one random rotation, so B A = 0 with both non-zero.
        bias: base biases the adapter trains and saves (PEFT's): "none", "all" (every bias
            of the model) or "lora_only" (the biases of the modules LoRA wraps).
        lora_bias: B gets a bias too (file key `lora_B.bias`); merging adds it to the base bias.
        target_parameters: parameter names (exact or dotted suffix) to adapt directly, for
            modules that use a weight without a linear layer (mixture-of-experts experts).
        trainable_token_indices: token ids whose embedding rows train in full (PEFT's
            TrainableTokens): a list for the input embedding, or {module name: ids}.
        ensure_weight_tying: an adapter on the input embedding or a layer tied to it
            (`lm_head`) is shared by all of them, so the tie holds (`weight_tying.py`).
        rank_pattern / alpha_pattern: per-module overrides, keys matched like target_modules.
        Targeting fields (target_modules, ...) are `TargetedConfig`'s.
    """

    PEFT_TYPE = "LORA"

    r: int = opt(8, "Rank of the update.")
    lora_alpha: float = opt(8, "Scale numerator: the update is scaled by lora_alpha / r.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch input, in [0, 1).")
    bias: str = opt(
        "none", "Base biases trained and saved with the adapter: none | all | lora_only."
    )
    use_rslora: bool = opt(False, "Scale by lora_alpha / sqrt(r) (rank-stabilised LoRA).")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (Linear and Conv1D layers).")
    init_lora_weights: bool | str = opt(
        True,
        "True (Kaiming A, zero B) | gaussian | pissa | pissa_niter_K | olora | orthogonal | "
        "False (both random: tests only).",
    )
    lora_bias: bool = opt(False, "Give B a trainable bias (PEFT's lora_bias).")
    layers_to_transform: list[int] | int | None = opt(
        None, "Only these layer indices (with layers_pattern naming the layer list)."
    )
    layers_pattern: list[str] | str | None = opt(
        None, "Name of the module list that holds the layers (e.g. layers, h)."
    )
    target_parameters: list[str] | None = opt(
        None, "Bare parameters to adapt, e.g. [feed_forward.experts.gate_up_proj] (MoE weights)."
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = opt(
        None, "Token ids whose embedding rows train in full: [ids] or {embedding name: [ids]}."
    )
    ensure_weight_tying: bool = opt(
        False, "Share one adapter between the input embedding and the layers tied to it."
    )
    rank_pattern: dict[str, int] = opt({}, "Per-module rank overrides: {name or regex: r}.")
    alpha_pattern: dict[str, float] = opt({}, "Per-module alpha overrides: {name: alpha}.")
    # PEFT's research variants: accepted only when off, so their files load or are refused.
    use_bdlora: Any = opt(None, "BD-LoRA (not supported; must stay unset).")
    velora_config: Any = opt(None, "VeLoRA (not supported; must stay unset).")
    kasa_config: Any = opt(None, "KaSA (not supported; must stay unset).")
    monteclora_config: Any = opt(None, "MonteCLoRA (not supported; must stay unset).")
    eva_config: Any = opt(None, "EVA (not supported; must stay unset).")
    corda_config: Any = opt(None, "CorDA (not supported; must stay unset).")
    lora_ga_config: Any = opt(None, "LoRA-GA (not supported; must stay unset).")
    loftq_config: Any = opt({}, "LoftQ (not supported; must stay empty).")
    arrow_config: Any = opt(None, "Arrow (not supported; must stay unset).")
    alora_invocation_tokens: Any = opt(None, "aLoRA (not supported; must stay unset).")
    use_qalora: bool = opt(False, "QA-LoRA (not supported; must stay False).")
    layer_replication: Any = opt(None, "Layer replication (not supported; must stay unset).")
    megatron_config: Any = opt(None, "Megatron-LM layers (not supported; must stay unset).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            f"r must be a positive integer, got {self.r!r}",
        )
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(
            0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}"
        )
        check_supported({f: getattr(self, f) for f in RESEARCH_FIELDS}, self.init_lora_weights)
        check_init(self.init_lora_weights)
        if self.lora_bias:
            _check(
                self.init_lora_weights in (True, False),
                "lora_bias=True needs init_lora_weights=True or False, got "
                f"{self.init_lora_weights!r}",
            )
            _check(not self.use_dora, "lora_bias=True does not work with use_dora=True")
        _check(
            self.bias in BIAS_CHOICES,
            f"bias must be one of {', '.join(map(repr, BIAS_CHOICES))}, got {self.bias!r}: "
            "'none' keeps the base biases frozen, 'all' trains every bias of the model, "
            "'lora_only' the biases of the adapted modules",
        )
        for key, value in self.rank_pattern.items():
            _check(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}] must be > 0")
        for key, value in self.alpha_pattern.items():
            _check(value > 0, f"alpha_pattern[{key!r}] must be > 0")
        self._warn_low_rank()

    def _warn_low_rank(self) -> None:
        low = [f"r={self.r}"] if self.r < LOW_RANK else []
        low += [f"rank_pattern[{k!r}]={v}" for k, v in self.rank_pattern.items() if v < LOW_RANK]
        if low:
            warnings.warn(
                f"LoRA rank {', '.join(low)} is very low: ranks of 1-2 tend to underfit; "
                "r=8 is a good start",
                stacklevel=4,
            )

    def layer_spec(self, module_name: str, initialize: bool) -> AdapterSpec:
        """The adapter settings for module `module_name` after rank / alpha patterns."""
        return AdapterSpec(
            r=int(pattern_value(self.rank_pattern, module_name, self.r)),
            alpha=float(pattern_value(self.alpha_pattern, module_name, self.lora_alpha)),
            dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            variant=DORA if self.use_dora else None,
            init=self.init_lora_weights if initialize else None,
            lora_bias=self.lora_bias,
        )

    def extra_layers(self, model: Any, initialize: bool) -> list[tuple[str, Any, Any]]:
        """The owners of `target_parameters` and the embeddings `trainable_token_indices`
        names, each with its layer factory and settings."""
        return self._parameter_layers(model, initialize) + self._token_layers(model, initialize)

    def _parameter_layers(self, model: Any, initialize: bool) -> list[tuple[str, Any, Any]]:
        if not self.target_parameters:
            return []
        owners = parameter_owners(model, self.target_parameters)
        return [
            (name, partial(for_parameters, names=params), self.layer_spec(name, initialize))
            for name, params in owners.items()
        ]

    def _token_layers(self, model: Any, initialize: bool) -> list[tuple[str, Any, Any]]:
        if not self.trainable_token_indices:
            return []
        targets = token_targets(model, self.trainable_token_indices)
        clash = sorted(set(targets) & set(self.modules_to_save or []))
        _check(
            not clash,
            f"{clash} is in both modules_to_save and trainable_token_indices; train it fully "
            "(modules_to_save) or some of its rows (trainable_token_indices), not both",
        )
        init = True if initialize else None  # PEFT starts the rows as the base rows, always
        return [
            (name, TrainableTokens, TokenSpec(tuple(ids), init)) for name, ids in targets.items()
        ]


def pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's rule: the first key that matches the module name as a dotted suffix wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
