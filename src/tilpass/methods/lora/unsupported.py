"""PEFT's LoRA research variants that tilpass does not implement, refused with one clear error.

A config (or an `adapter_config.json` written by PEFT) that turns one of them on would
otherwise load as plain LoRA and silently give other outputs than PEFT; instead it is refused
with the list of what is supported. Each field is accepted at its "off" value, which is what
PEFT writes for adapters that do not use the variant.
"""

from __future__ import annotations

from typing import Any

from tilpass.errors import TilpassError

RESEARCH_FIELDS: dict[str, str] = {
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "eva_config": "EVA",
    "corda_config": "CorDA",
    "lora_ga_config": "LoRA-GA",
    "loftq_config": "LoftQ",
    "arrow_config": "Arrow",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron-LM parallel layers",
}
"""Config field -> the variant it turns on."""

RESEARCH_INITS: dict[str, str] = {
    "eva": "EVA",
    "corda": "CorDA",
    "loftq": "LoftQ",
    "lora_ga": "LoRA-GA",
    "mica": "MiCA",
}
"""`init_lora_weights` value -> the variant it selects."""

SUPPORTED = (
    "plain LoRA, rsLoRA (use_rslora), DoRA (use_dora), lora_bias, lora_dropout, "
    "rank_pattern / alpha_pattern, modules_to_save, trainable_token_indices, target_parameters, "
    "and init_lora_weights = True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora' or "
    "'orthogonal'; on nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, "
    "nn.Conv3d and nn.MultiheadAttention"
)


class UnsupportedVariantError(TilpassError, ValueError):
    """A LoRA research variant that tilpass does not implement."""


def is_off(value: Any) -> bool:
    """True for the values PEFT writes when a variant is not used."""
    return value is None or value is False or value == {} or value == []


def check_supported(fields: dict[str, Any], init_lora_weights: Any) -> None:
    """Raise `UnsupportedVariantError` naming the first research variant that is turned on."""
    for name, variant in RESEARCH_FIELDS.items():
        if not is_off(fields.get(name)):
            raise UnsupportedVariantError(
                f"{name}={fields[name]!r} turns on {variant}, which is not supported by tilpass; "
                f"supported are: {SUPPORTED}. Remove {name} (or use PEFT for {variant})."
            )
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() in RESEARCH_INITS:
        variant = RESEARCH_INITS[init_lora_weights.lower()]
        raise UnsupportedVariantError(
            f"init_lora_weights={init_lora_weights!r} selects {variant}, which is not supported "
            f"by tilpass; supported are: {SUPPORTED}."
        )
