"""tilpass: parameter-efficient fine-tuning with PEFT-compatible adapter files.

The public API mirrors Hugging Face PEFT's, so PEFT code ports by changing the import.
"""

from tilpass.config import AdapterConfig
from tilpass.errors import AdapterFileError, AdapterNameError, TargetModulesError, TilpassError
from tilpass.methods.lora import LoraConfig
from tilpass.methods.lora_prompt import LoraPromptConfig
from tilpass.methods.prompt import PromptTuningConfig
from tilpass.model import AdaptedModel, PeftModel, get_peft_model
from tilpass.pretrained import load_model

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterNameError",
    "LoraConfig",
    "LoraPromptConfig",
    "PeftModel",
    "PromptTuningConfig",
    "TargetModulesError",
    "TilpassError",
    "get_peft_model",
    "load_model",
]
