"""LoRA (with rsLoRA scaling and the DoRA variant) over Linear, GPT-2 Conv1D and Embedding.

For a frozen weight W (out, in) and each active adapter with A (r, in), B (out, r):

    y = base(x) + s * B A dropout(x),        s = alpha / r   (alpha / sqrt(r) with rsLoRA)

DoRA (Linear and Conv1D, `dora.py`) rescales each output row by a learned magnitude m:

    y = m / ||W + s B A||_row * (W x + s B A x) + b     (the norm is detached, as in the paper)

The layer keeps the base weight under its own key (`q_proj.weight`, not `base_layer.weight`),
so the adapted model's base keys are the base model's. Merging adds `s B A` into W in place;
unmerging subtracts it again.

Files: `config.py` (LoraConfig), `layers.py` (the layers), `dora.py` (the DoRA variant),
`fused.py` (a Linear layer's adapter and frozen base as one autograd node), `weighted.py`
(`add_weighted_adapter`: new adapters from weighted combinations of others).
"""

from tilpass.methods.lora.config import LoraConfig
from tilpass.methods.lora.layers import (
    AdapterSpec,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    make_layer,
)
from tilpass.methods.lora.weighted import add_weighted_adapter
from tilpass.methods.registry import Method

METHOD = Method(
    name="lora",
    config_class=LoraConfig,
    make_layer=make_layer,
    description="LoRA: trainable low-rank B A beside frozen weights (rsLoRA, DoRA variant)",
    prefix="lora_",
    add_weighted=add_weighted_adapter,
)

__all__ = [
    "METHOD",
    "AdapterSpec",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "make_layer",
]
