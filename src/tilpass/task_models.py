"""PEFT's task-specific model classes (`PeftModelForCausalLM`, ...), so code that builds or
loads one by name ports unchanged.

They are `AdaptedModel` itself: tilpass's model passes every call through to the base model,
so a task needs no forward of its own. What PEFT's classes add is kept: the sequence and
token classification models train their head (`classifier` or `score`) in full and the
question-answering model its `qa_outputs`, as `modules_to_save` of the first adapter (only
the names the model has; PEFT skips the others the same way).
"""

from __future__ import annotations

import copy
from typing import ClassVar

from torch import nn

from tilpass.config import AdapterConfig
from tilpass.inject import base_modules
from tilpass.model import DEFAULT, AdaptedModel


class _TaskModel(AdaptedModel):
    """An `AdaptedModel` whose first adapter also trains the task's head modules."""

    HEADS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: AdapterConfig | None = None,
        adapter_name: str = DEFAULT,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        if peft_config is not None and self.HEADS:
            peft_config = with_heads(model, peft_config, self.HEADS)
        super().__init__(model, peft_config, adapter_name, autocast_adapter_dtype)


def with_heads(model: nn.Module, config: AdapterConfig, heads: tuple[str, ...]) -> AdapterConfig:
    """A copy of `config` whose `modules_to_save` adds the `heads` that `model` has."""
    if not hasattr(config, "modules_to_save"):
        return config
    names = [n for n, _ in base_modules(model) if n]
    present = [h for h in heads if any(n == h or n.endswith(f".{h}") for n in names)]
    saved = list(getattr(config, "modules_to_save", None) or [])
    extra = [h for h in present if h not in saved]
    if not extra:
        return config
    config = copy.copy(config)
    config.modules_to_save = saved + extra  # type: ignore[attr-defined]
    return config


class PeftModelForCausalLM(_TaskModel):
    """PEFT's causal language model class: an `AdaptedModel`."""


class PeftModelForSeq2SeqLM(_TaskModel):
    """PEFT's sequence-to-sequence model class: an `AdaptedModel`."""


class PeftModelForFeatureExtraction(_TaskModel):
    """PEFT's feature-extraction model class: an `AdaptedModel`."""


class PeftModelForSequenceClassification(_TaskModel):
    """PEFT's sequence classification class: the head (`classifier` / `score`) trains too."""

    HEADS = ("classifier", "score")


class PeftModelForTokenClassification(_TaskModel):
    """PEFT's token classification class: the head (`classifier` / `score`) trains too."""

    HEADS = ("classifier", "score")


class PeftModelForQuestionAnswering(_TaskModel):
    """PEFT's question-answering class: the span head (`qa_outputs`) trains too."""

    HEADS = ("qa_outputs",)


TASK_MODELS: dict[str, type[AdaptedModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
}
"""The class PEFT's `get_peft_model` returns for each `task_type`."""
