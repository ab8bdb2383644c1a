"""Base biases trained with an adapter: PEFT's `bias="all"` and `bias="lora_only"`.

PEFT lets one adapter train biases of the base model besides its own tensors: `"all"` trains
every bias of the model, `"<method>_only"` (LoRA's `"lora_only"`) the biases of the modules the
adapter wraps. Such biases are saved in the adapter file under PEFT's keys (a wrapped
module's bias as `<path>.base_layer.bias`, any other as `<path>.bias`) and loading the file
writes them back into the base model. This is the one case where an adapter changes base
tensors, so disabling the adapter does not give the base model's output (PEFT warns; so does
tilpass). Only one adapter per model may train biases, as in PEFT.
"""

from __future__ import annotations

from torch import nn

from tilpass.inject import adapter_layers
from tilpass.layers import AdapterLayer
from tilpass.saved_modules import ModulesToSave

NONE = "none"
ALL = "all"
DISABLE_WARNING = (
    "Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
    "same output as the base model would without adaption."
)


def bias_mode(config: object) -> str:
    """A config's `bias` setting ("none" for methods without one)."""
    return str(getattr(config, "bias", NONE))


def trained_biases(root: nn.Module, adapter_name: str, bias: str) -> dict[str, nn.Parameter]:
    """The base biases adapter `adapter_name` trains under `bias`, by PEFT's key (without the
    `base_model.model.` prefix): `{}` for "none"."""
    if bias == NONE:
        return {}
    layers = dict(adapter_layers(root))
    if bias == ALL:
        return all_biases(root, layers)
    out = {}
    for path, layer in layers.items():
        param = getattr(layer, "bias", None)
        if adapter_name in layer.specs and isinstance(param, nn.Parameter) and _wraps(layer):
            out[_join(path, "base_layer.bias")] = param
    return out


def all_biases(root: nn.Module, layers: dict[str, AdapterLayer]) -> dict[str, nn.Parameter]:
    """Every bias parameter of the model that no adapter owns, by PEFT's key."""
    owned = {
        id(p) for layer in layers.values() for name in layer.specs
        for p in layer.adapter_parameters(name)
    }  # fmt: skip
    out = {}
    for name, param in root.named_parameters(remove_duplicate=True):
        if (name == "bias" or name.endswith(".bias")) and id(param) not in owned:
            out[peft_key(name, layers)] = param
    return out


def peft_key(name: str, layers: dict[str, AdapterLayer]) -> str:
    """PEFT's key of a base parameter: the wrapped module's parameters sit under
    `base_layer.` in PEFT's layers, while tilpass keeps the base model's names."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the innermost layer that holds the parameter
        owner = ".".join(parts[:cut])
        layer = layers.get(owner)
        if layer is not None:
            if not _wraps(layer):
                return name
            return _join(owner, "base_layer." + ".".join(parts[cut:]))
    return name


def _wraps(layer: AdapterLayer) -> bool:
    """A layer PEFT names its wrapped module `base_layer` in: not a modules_to_save wrapper
    (whose `original_module` keeps its name), and one that adopted the module's tensors."""
    return layer.adopted and not isinstance(layer, ModulesToSave)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_one_bias_adapter(configs: dict[str, object], new_name: str, new_config: object) -> None:
    """PEFT's rule: at most one adapter of a model trains biases (they are shared tensors)."""
    with_bias = [n for n, c in configs.items() if bias_mode(c) != NONE]
    if bias_mode(new_config) != NONE:
        with_bias.append(new_name)
    if len(with_bias) > 1:
        raise ValueError(
            "tilpass supports only 1 adapter with bias. When using multiple adapters, set bias "
            f"to 'none' for all adapters but one: {with_bias} have bias != 'none', and the "
            "base biases they train are shared by every adapter"
        )
