"""AdaLoRA: LoRA in SVD form whose rank budget is allocated by importance during training.

Files: `config.py` (AdaLoraConfig, with PEFT's fields), `layer.py` (the SVD-form layer, a
`LoraLinear` whose pair is (Lambda P, Q)), `allocator.py` (importance scores, the cubic budget
schedule, masking), `training.py` (the trainer hooks: orthogonality regulariser and allocator),
`report.py` (the final ranks as a table and a figure), `export.py` (the fold to a plain LoRA
adapter). Files are PEFT's AdaLoRA format: keys `lora_A`, `lora_E`, `lora_B` per module and the
kept triplets per module in `rank_pattern`.
"""

from torch import nn

from tilpass.layers import is_linear_like
from tilpass.methods.adalora.config import AdaLoraConfig, AdaLoraSpec
from tilpass.methods.adalora.export import export_lora, to_lora
from tilpass.methods.adalora.layer import AdaLoraLinear
from tilpass.methods.adalora.report import report
from tilpass.methods.adalora.training import AdaLoraTraining, training_hooks
from tilpass.methods.registry import Method


def make_layer(module: nn.Module) -> AdaLoraLinear:
    """Wrap a linear-like module in an AdaLoRA layer, or raise naming the unsupported type."""
    if is_linear_like(module):
        return AdaLoraLinear(module)
    raise TypeError(
        "AdaLoRA supports torch.nn.Linear (and linear-like layers) and transformers Conv1D, "
        f"not {type(module).__name__}"
    )


METHOD = Method(
    name="adalora",
    config_class=AdaLoraConfig,
    make_layer=make_layer,
    description="AdaLoRA: LoRA in SVD form, rank budget pruned by importance while training",
    training_hooks=training_hooks,
    prefix="lora_",
    report=report,
)

__all__ = [
    "METHOD",
    "AdaLoraConfig",
    "AdaLoraLinear",
    "AdaLoraSpec",
    "AdaLoraTraining",
    "export_lora",
    "make_layer",
    "to_lora",
]
