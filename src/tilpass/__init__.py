"""tilpass: parameter-efficient fine-tuning with PEFT-compatible adapter files.

The public API mirrors Hugging Face PEFT's, so PEFT code ports by changing the import.
"""

from tilpass.adapter_state import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from tilpass.base_state import get_base_model_state_dict, set_base_model_state_dict
from tilpass.config import AdapterConfig, PeftConfig, PeftType
from tilpass.errors import (
    AdapterFileError,
    AdapterNameError,
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    TargetModulesError,
    TilpassError,
)
from tilpass.methods.adalora import AdaLoraConfig
from tilpass.methods.lora import LoraConfig
from tilpass.methods.lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from tilpass.methods.lora.optimizers import (
    LoraFAOptimizer,
    create_lorafa_optimizer,
    create_loraplus_optimizer,
)
from tilpass.methods.lora_prompt import LoraPromptConfig
from tilpass.methods.prompt import PromptTuningConfig
from tilpass.model import AdaptedModel, PeftModel, get_peft_model
from tilpass.pretrained import load_model
from tilpass.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from tilpass.task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterNameError",
    "LoraConfig",
    "LoraFAOptimizer",
    "LoraPromptConfig",
    "NoMatchingPeftModuleError",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PromptTuningConfig",
    "TargetModulesError",
    "TilpassError",
    "TunerLayerStatus",
    "TunerModelStatus",
    "create_lorafa_optimizer",
    "create_loraplus_optimizer",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "load_model",
    "prepare_model_for_compiled_hotswap",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
