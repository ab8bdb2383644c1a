"""`LoraConfig`: LoRA's settings, with PEFT's field names, meanings and validation."""

from __future__ import annotations

import dataclasses
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from tilpass.config import TargetedConfig
from tilpass.config_fields import opt
from tilpass.errors import TargetModulesError
from tilpass.methods.lora.dora import DORA
from tilpass.methods.lora.init import canonical_init, check_init, mutates_base
from tilpass.methods.lora.layers import AdapterSpec
from tilpass.methods.lora.parameter import (
    check_parameter_owner,
    check_same_targets,
    for_parameters,
    parameter_owners,
)
from tilpass.methods.lora.trainable_tokens import TokenSpec, TrainableTokens, token_targets
from tilpass.methods.lora.unsupported import RESEARCH_FIELDS, check_supported

LOW_RANK = 4
BIAS_CHOICES = ("none", "all", "lora_only")
RUNTIME = "runtime"
"""Metadata flag of config fields that hold settings for this process only: never saved to
`adapter_config.json` and not run settings (PEFT's `runtime_config`)."""


@dataclasses.dataclass
class LoraRuntimeConfig:
    """PEFT's settings of a LoRA config that are never saved (`LoraConfig.runtime_config`).

    Attributes:
        ephemeral_gpu_offload: PEFT copies a CPU-held base weight to the GPU for the
            DoRA initialisation; tilpass computes on the weight's own device, so it changes
            nothing here (accepted so PEFT code and configs carry over).
    """

    ephemeral_gpu_offload: bool = False


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
    runtime_config: LoraRuntimeConfig = dataclasses.field(
        default_factory=LoraRuntimeConfig,
        metadata={"help": "Settings for this process only (never saved).", RUNTIME: True},
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
        if isinstance(self.runtime_config, dict):  # as a JSON or YAML mapping would give it
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        _check(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            f"r must be a positive integer, got {self.r!r}",
        )
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(
            0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}"
        )
        _check(
            not (self.use_dora and self.megatron_config),
            "DoRA does not support megatron_core, please set `use_dora=False`.",
        )
        check_supported({f: getattr(self, f) for f in RESEARCH_FIELDS}, self.init_lora_weights)
        check_init(self.init_lora_weights)
        if isinstance(self.target_parameters, str):
            raise TypeError(
                "`target_parameters` must be a list of strings or None. Unlike target_modules, "
                f"a string is not taken as a regex: write [{self.target_parameters!r}]"
            )
        if self.lora_bias:
            _check(
                self.init_lora_weights in (True, False),
                "The argument lora_bias=True is only supported with init_lora_weights=True or "
                f"False, got init_lora_weights={self.init_lora_weights!r} instead.",
            )
            _check(
                not self.use_dora,
                "The argument lora_bias=True is not supported for DoRA, please pass use_dora=False",
            )
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
        self._warn_no_conversion()

    def _warn_no_conversion(self) -> None:
        """PEFT's warning: PiSSA / OLoRA adapters with rsLoRA and rank or alpha patterns cannot
        be converted to plain LoRA on saving (the per-layer scale is not in the file)."""
        patterns = bool(self.rank_pattern or self.alpha_pattern)
        if self.use_rslora and patterns and mutates_base(self.init_lora_weights):
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training "
                "conversion of modified base weights PiSSA/OLoRA means that you won't be able "
                "to pass `path_initial_model_for_weight_conversion` to `save_pretrained` to "
                "restore the initial values of the base weights; if you intend to do this, "
                "please ensure not to use rslora or rank_pattern/alpha_pattern.",
                stacklevel=4,
            )

    def to_dict(self) -> dict[str, Any]:
        """The saved fields: `runtime_config` is left out, as PEFT leaves it out."""
        out = super().to_dict()
        out.pop("runtime_config", None)
        return out

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
            init=self._layer_init(initialize),
            lora_bias=self.lora_bias,
        )

    def _layer_init(self, initialize: bool) -> bool | str | None:
        """The layers' `init`: None when only allocating for a load, except for PiSSA / OLoRA,
        whose residual base weight is recomputed on loading as PEFT does (the file holds only
        A and B; the trained model is residual + s B A)."""
        init = canonical_init(self.init_lora_weights)
        return init if initialize or mutates_base(init) else None

    def extra_layers(self, model: Any, initialize: bool) -> list[tuple[str, Any, Any]]:
        """The owners of `target_parameters` and the embeddings `trainable_token_indices`
        names, each with its layer factory and settings."""
        return self._parameter_layers(model, initialize) + self._token_layers(model, initialize)

    def _parameter_layers(self, model: Any, initialize: bool) -> list[tuple[str, Any, Any]]:
        if not self.target_parameters:
            return []
        owners = parameter_owners(model, self.target_parameters, strict=False)
        if not owners:
            self._no_parameter_matched(model)
            return []
        for name in owners:
            check_parameter_owner(model, name, self.target_modules)
        check_same_targets(model, owners)
        return [
            (name, partial(for_parameters, names=params), self.layer_spec(name, initialize))
            for name, params in owners.items()
        ]

    def _no_parameter_matched(self, model: Any) -> None:
        """PEFT's rule when no `target_parameters` entry names a parameter: an error if
        `target_modules` is empty too (nothing would be adapted), else a warning."""
        if not self.target_modules:
            some = [n for n, _ in model.named_parameters()][:4]
            raise TargetModulesError(
                "No `target_modules` passed but also no `target_parameters` found. Please check "
                f"the values for these arguments. target_parameters={self.target_parameters} "
                f"name no parameter of {type(model).__name__}; an entry is a parameter's full "
                f"name or a dotted suffix of it, such as {some}"
            )
        warnings.warn(
            f"target_parameters={self.target_parameters} were set but no parameter was matched. "
            "Only target_modules are adapted; an entry is a parameter's full name or a dotted "
            "suffix of it (e.g. 'experts.gate_up_proj')",
            RuntimeWarning,
            stacklevel=5,
        )

    @property
    def changes_base_weights(self) -> bool:
        """PiSSA and OLoRA replace the base weight by a residual, on creation and on loading."""
        return mutates_base(self.init_lora_weights)

    def converted_for_initial_model(
        self, tensors: dict[str, Any], initial: Path
    ) -> tuple[LoraConfig, dict[str, Any]]:
        """A PiSSA / OLoRA adapter as a plain LoRA adapter of rank 2r for the base model before
        its initialisation (`conversion.py`), with (B0, A0) from the directory `initial`."""
        from tilpass.methods.lora.conversion import convert_to_lora

        return convert_to_lora(self, tensors, initial)

    def check_new_adapter(self, existing: dict[str, Any]) -> None:
        """PEFT's rule: every adapter of a model that uses `target_parameters` targets the same
        parameters (a layer adapts a fixed set of them, and files do not say which); and its
        warning when a PiSSA / OLoRA adapter, which changes the base weights, meets others."""
        _warn_base_changed([self, *existing.values()])
        if not self.target_parameters:
            return
        wanted = set(self.target_parameters)
        for name, other in existing.items():
            theirs = getattr(other, "target_parameters", None)
            if theirs and set(theirs) != wanted:
                raise ValueError(
                    "When using multiple adapters with `target_parameters`, all adapters must "
                    f"target the same set of parameters, but got {sorted(wanted)} for the new "
                    f"adapter and {sorted(theirs)} for adapter {name!r}. Use a separate copy of "
                    "the model for adapters on other parameters."
                )

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


def _warn_base_changed(configs: list[Any]) -> None:
    """PEFT's warning: a PiSSA / OLoRA adapter changed the base weights, so other adapters on
    the same model no longer run on the weights they were trained on."""
    if len(configs) < 2:
        return
    for config in configs:
        init = canonical_init(getattr(config, "init_lora_weights", None))
        if mutates_base(init):
            name = "OLoRA" if init == "olora" else "PiSSA"
            warnings.warn(
                f"{name} changes the base weights of the model and should thus not be used with "
                f"other adapters. Consider converting the {name} adapter into a normal LoRA "
                "adapter: save_pretrained(..., path_initial_model_for_weight_conversion=<the "
                "adapter saved before training>).",
                stacklevel=5,
            )
            return


def pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's rule: the first key that matches the module name as a dotted suffix wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
