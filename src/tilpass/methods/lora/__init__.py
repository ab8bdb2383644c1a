"""LoRA (with rsLoRA scaling and the DoRA variant) over Linear, GPT-2 Conv1D, Embedding and
Conv1d / Conv2d / Conv3d.

For a frozen weight W (out, in) and each active adapter with A (r, in), B (out, r):

    y = base(x) + s * B A dropout(x),        s = alpha / r   (alpha / sqrt(r) with rsLoRA)

DoRA (Linear and Conv1D, `dora.py`) rescales each output row by a learned magnitude m:

    y = m / ||W + s B A||_row * (W x + s B A x) + b     (the norm is detached, as in the paper)

The layer keeps the base weight under its own key (`q_proj.weight`, not `base_layer.weight`),
so the adapted model's base keys are the base model's. Merging adds `s B A` into W in place;
unmerging subtracts it again.

A MultiheadAttention's adapter, and one on bare parameters (`target_parameters`, e.g.
mixture-of-experts weights), adds s B A to the parameters for the call (`parameter.py`).
A convolution's adapter is two convolutions, A with the base's kernel and B 1 x 1
(`conv.py`); `lora_bias=True` gives B a bias, scaled with B and merged into the base bias.

Files: `config.py` (LoraConfig), `layers.py` (the shared base and the Linear layer),
`embedding.py`, `conv.py`, `parameter.py` and `attention.py` (the other layer kinds),
`trainable_tokens.py` (`trainable_token_indices`), `defaults.py` (the modules adapted when
`target_modules` is unset, per model family), `dora.py` (the DoRA variant per layer
kind), `init.py` (PiSSA, OLoRA and orthogonal initialisation), `conversion.py` (a PiSSA /
OLoRA adapter saved as plain LoRA), `layer_checks.py` (PEFT's checks of a layer's settings
against its module), `unsupported.py` (PEFT's
research variants, refused), `fused.py` (a Linear layer's adapter and frozen base as one
autograd node), `tying.py` (adapters shared with a tied input embedding),
`weighted.py` (`add_weighted_adapter`: new adapters from
weighted combinations of others).
"""

from torch import nn

from tilpass.layers import is_linear_like
from tilpass.methods.lora.attention import LoraAttention, for_attention
from tilpass.methods.lora.config import LoraConfig
from tilpass.methods.lora.conv import CONV_TYPES, LoraConv
from tilpass.methods.lora.defaults import select_targets
from tilpass.methods.lora.embedding import LoraEmbedding
from tilpass.methods.lora.layers import AdapterSpec, LoraLayer, LoraLinear
from tilpass.methods.lora.parameter import LoraParameters
from tilpass.methods.lora.tying import tie_to_embedding
from tilpass.methods.lora.weighted import add_weighted_adapter
from tilpass.methods.registry import Method


def make_layer(module: nn.Module) -> LoraLayer | LoraParameters:
    """Wrap a supported module in its LoRA layer, or raise naming the unsupported type."""
    if isinstance(module, nn.MultiheadAttention):
        return for_attention(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, CONV_TYPES):
        return LoraConv(module)
    if is_linear_like(module):
        return LoraLinear(module)
    raise TypeError(
        "LoRA supports torch.nn.Linear (and linear-like layers), transformers Conv1D, "
        "torch.nn.Embedding, torch.nn.Conv1d / Conv2d / Conv3d and torch.nn.MultiheadAttention "
        f"(and bare parameters through target_parameters), not {type(module).__name__}"
    )


METHOD = Method(
    name="lora",
    config_class=LoraConfig,
    make_layer=make_layer,
    description="LoRA: trainable low-rank B A beside frozen weights (rsLoRA, DoRA variant)",
    prefix="lora_",
    add_weighted=add_weighted_adapter,
    select_targets=select_targets,
    tie_layer=tie_to_embedding,
)

__all__ = [
    "METHOD",
    "AdapterSpec",
    "LoraAttention",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraParameters",
    "make_layer",
]
