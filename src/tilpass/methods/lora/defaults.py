"""LoRA's default target modules per model family, used when `target_modules` is unset.

PEFT adapts the attention's query and value projections of a known `transformers` model when a
LoRA config names no targets; tilpass does the same, with the same modules per family (the
`model_type` of the model's config), so a config written for PEFT selects the same layers.
"""

from __future__ import annotations

from torch import nn

from tilpass.errors import TargetModulesError
from tilpass.inject import describe_modules, find_targets
from tilpass.methods.lora.config import LoraConfig

QUERY_VALUE = ("q_proj", "v_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    **dict.fromkeys(
        (
            "bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm",
            "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
        ),
        QUERY_VALUE,
    ),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),
    **dict.fromkeys(
        ("bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon"),
        ("query_key_value",),
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "layoutlm"), ("query", "value")),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "mpt": ("Wqkv",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
}  # fmt: skip
"""`model_type` -> the modules LoRA adapts by default (PEFT's choice for each family)."""


def select_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules `config` adapts: its `target_modules`, or (unset) the family's defaults,
    which are then written into the config, as PEFT records them."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = DEFAULT_TARGETS.get(str(model_type))
        if default is None:
            known = "" if model_type is None else f" for model type {model_type!r}"
            raise TargetModulesError(
                f"target_modules is not set and LoRA has no default{known}; say which modules "
                f"to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'. This model has: "
                f"{describe_modules(model)}"
            )
        config.target_modules = sorted(default)
    return find_targets(model, config)
