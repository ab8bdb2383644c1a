"""Adaptation methods, one file each; `CONFIGS` maps PEFT's `peft_type` to the config class."""

from __future__ import annotations

from tilpass.config import AdapterConfig
from tilpass.methods.lora import LoraConfig

CONFIGS: dict[str, type[AdapterConfig]] = {"LORA": LoraConfig}
