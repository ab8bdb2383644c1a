"""LoRA + prompt tuning in one adapter: low-rank updates on chosen modules and virtual tokens
in front of every sequence, trained, saved, loaded, served and merged as one unit.

The model computes, for the LoRA targets W and the input embeddings E,

    y = W x + s B A x                      on every LoRA target (as `methods/lora`)
    inputs_embeds = [V ; E]                 with P virtual tokens V (as `methods/prompt`)

using the two methods' own layers, so a hybrid adapter, a plain LoRA adapter and a plain
prompt-tuning adapter can sit side by side in one model and one mixed batch. Merging folds
the LoRA part into the weights and keeps the virtual tokens.

File format (`docs/format.md`): `adapter_config.json` holds every LoraConfig field and the
prompt-tuning fields, with `peft_type: "LORA_PROMPT"`; `adapter_model.safetensors` holds the
LoRA tensors under PEFT's keys and one `prompt_embeddings` tensor. `export_lora` writes the
LoRA part alone as a plain PEFT LoRA adapter directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from tilpass.adapter_files import WEIGHTS_NAME, load_tensors, save_tensors
from tilpass.config import read_config_dict
from tilpass.config_fields import opt
from tilpass.errors import TargetModulesError
from tilpass.inject import find_targets
from tilpass.methods.lora import LoraConfig, LoraLayer
from tilpass.methods.lora import make_layer as make_lora_layer
from tilpass.methods.prompt import (
    PromptEmbedding,
    PromptFields,
    PromptTuningConfig,
    input_embedding_name,
)
from tilpass.methods.prompt import make_layer as make_prompt_layer
from tilpass.methods.registry import Method

PROMPT_KEY = "prompt_embeddings"
PROMPT_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(PromptTuningConfig)
    if f.name not in {g.name for g in dataclasses.fields(LoraConfig)}
)


@dataclasses.dataclass
class LoraPromptConfig(PromptFields, LoraConfig):
    """LoRA's fields (`r`, `target_modules`, ...) plus prompt tuning's, with PEFT's names.

    Attributes:
        input_embedding: the module path of the input embedding the virtual tokens go in
            front of (filled in from the model; recorded so a reader of the file knows).
        The prompt-tuning fields mean what they mean in `PromptTuningConfig`.
    """

    PEFT_TYPE = "LORA_PROMPT"

    input_embedding: str | None = opt(None, "Module path of the input embedding (filled in).")

    def __post_init__(self) -> None:
        super().__post_init__()
        # validates the prompt-tuning fields, and spells the init as PEFT does (upper case)
        self.prompt_tuning_init = self.prompt_part().prompt_tuning_init

    def prompt_part(self) -> PromptTuningConfig:
        """The prompt-tuning half as a `PromptTuningConfig`."""
        return PromptTuningConfig(**{name: getattr(self, name) for name in PROMPT_FIELDS})

    def lora_part(self) -> LoraConfig:
        """The LoRA half as a plain `LoraConfig` (what PEFT reads)."""
        names = [f.name for f in dataclasses.fields(LoraConfig)]
        return LoraConfig(**{name: getattr(self, name) for name in names})

    def layer_spec(self, module_name: str, initialize: bool) -> Any:
        if module_name == self.input_embedding:
            return self.prompt_part().layer_spec(module_name, initialize)
        return super().layer_spec(module_name, initialize)


def select_targets(model: nn.Module, config: LoraPromptConfig) -> list[str]:
    """LoRA's targets (PEFT's name matching) plus the input embedding."""
    embedding = input_embedding_name(model)
    targets = find_targets(model, config)
    embeddings = [n for n in targets if isinstance(_unwrapped(model, n), nn.Embedding)]
    if embeddings:
        raise TargetModulesError(
            f"target_modules matched the embedding {embeddings[0]!r}: in a lora+prompt adapter "
            "the input embedding carries the virtual tokens, so LoRA cannot target embeddings; "
            "leave them out of target_modules"
        )
    prompt = config.prompt_part()
    prompt.describe_model(model, _unwrapped(model, embedding))
    for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
        setattr(config, name, getattr(prompt, name))
    config.input_embedding = embedding
    return [*targets, embedding]


def _unwrapped(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)


def make_layer(module: nn.Module) -> nn.Module:
    """The prompt layer for the input embedding, LoRA's layer for every other target."""
    if isinstance(module, nn.Embedding):
        return make_prompt_layer(module)
    return make_lora_layer(module)


def owns_layer(layer: nn.Module) -> bool:
    """Hybrid adapters go into LoRA layers and prompt layers (shared with those methods)."""
    return isinstance(layer, (LoraLayer, PromptEmbedding))


def export_lora(directory: str | Path, target: str | Path) -> Path:
    """Write the LoRA part of the hybrid adapter in `directory` as a plain PEFT LoRA adapter
    in `target` (`peft_type: "LORA"`, the LoRA tensors only), which PEFT loads as it is."""
    from tilpass.methods.registry import method_for_peft_type

    data = read_config_dict(directory)
    source = str(Path(directory) / "adapter_config.json")
    config = method_for_peft_type(str(data["peft_type"])).config_class.from_dict(data, source)
    if not isinstance(config, LoraPromptConfig):
        raise ValueError(f"{source}: peft_type {config.peft_type}, expected LORA_PROMPT")
    tensors = {k: v for k, v in load_tensors(Path(directory)).items() if k != PROMPT_KEY}
    save_tensors(Path(target) / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    lora = config.lora_part()
    lora.inference_mode = True
    return lora.save(target).parent


METHOD = Method(
    name="lora+prompt",
    config_class=LoraPromptConfig,
    make_layer=make_layer,
    description="LoRA and prompt tuning in one adapter: low-rank updates plus virtual tokens",
    select_targets=select_targets,
    owns_layer=owns_layer,
)
