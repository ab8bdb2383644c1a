"""Training memory before anything is loaded: the model's config on the meta device, counted.

`estimate` builds the model from its config on PyTorch's `meta` device (shapes, no weights)
and counts, per method, the bytes of:

- base weights: every parameter in the model's dtype; for `qlora` the linear layers that
  `tilpass.quantize.quantize_model` would quantize are counted as bitsandbytes stores NF4
  with double quantization (a byte per two weights, an 8-bit scale per 64, a float32 scale
  per 256 scales, and one shared copy of the code books), the rest (output head, embeddings,
  norms) as is;
- adapter weights: LoRA's A (r x in) and B (out x r) on the targeted linear layers, in the
  base's dtype (float32 over a quantized base, as the LoRA layer creates them);
- gradients: one per trainable value, in its dtype;
- optimizer state: AdamW's two moments per trainable value, in its dtype (torch keeps them
  in the parameter's dtype);
- activations (an estimate): what the backward pass keeps per token and layer in a Llama-style
  block, about 10 x hidden + 3 x intermediate values (norm inputs, q/k/v, attention output,
  MLP input, gate, up and activation), in the compute dtype; with activation checkpointing only
  the hidden state at each layer's input, plus one layer recomputed.

The weights line is exact for the formats tilpass creates (the tests check it against a
quantized model's measured bytes); the activation line is an estimate, and leaves out the
attention's workspace (the fused attention kernels do not store the scores) and the logits
(tilpass's loss computes them in blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilpass.quantize import BLOCKSIZE

METHODS = ("full", "lora", "qlora")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the 4-bit block scales in blocks of 256

LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # Published Llama 2 configs (config.json of meta-llama/Llama-2-*-hf).
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
}  # fmt: skip
"""Configs `--model` accepts by name, so the common sizes need no download."""

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MemoryOptions:
    """What the estimate is for.

    Attributes:
        r: LoRA rank.
        target_modules: the adapted modules ("all-linear": every linear layer but the head,
            as in the QLoRA paper).
        batch / seq: sequences per step and tokens per sequence.
        dtype: the base's dtype for full and lora, and the compute dtype of every method.
        checkpointing: activation checkpointing on.
    """

    r: int = 16
    target_modules: list[str] | str = "all-linear"
    batch: int = 4
    seq: int = 512
    dtype: torch.dtype = torch.bfloat16
    checkpointing: bool = False


@dataclass
class MemoryEstimate:
    """Bytes per line for one method; `total` adds them up."""

    method: str
    lines: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.lines.values())


LINES = ("base weights", "adapter weights", "gradients", "optimizer state", "activations (est.)")


def model_config(name_or_path: str) -> Any:
    """A transformers config: a preset name, a config.json file, or a model directory/name."""
    from transformers import AutoConfig, LlamaConfig

    if name_or_path in LLAMA_PRESETS:
        return LlamaConfig(vocab_size=32000, **LLAMA_PRESETS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    from tilpass.pretrained import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model built from its config on the meta device: shapes and dtypes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for `numel` weights in NF4 (data and scales; the code books,
    one copy shared by all layers, are `nf4_code_book_bytes`)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    data = math.ceil(numel / 2)
    if not double_quant:
        return data + blocks * 4
    nested = math.ceil(blocks / NESTED_BLOCKSIZE)
    return data + blocks + nested * 4 + 4  # + offset (one float32)


def nf4_code_book_bytes(double_quant: bool = True) -> int:
    """The code books a quantized model stores once (`quantize_model` shares them): the 16 NF4
    values and, with double quantization, the 256 values of the scales' 8-bit code."""
    return 16 * 4 + (256 * 4 if double_quant else 0)


def _quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers `quantize_model` would quantize: plain nn.Linear, not the head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {
        n: m
        for n, m in model.named_modules()
        if n and type(m) is nn.Linear and m is not head and n.split(".")[-1] != "lm_head"
    }


def _targets(model: nn.Module, options: MemoryOptions) -> list[nn.Linear]:
    from tilpass.inject import find_targets
    from tilpass.methods.lora import LoraConfig

    config = LoraConfig(r=options.r, target_modules=options.target_modules)
    return [model.get_submodule(n) for n in find_targets(model, config)]


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # named_parameters yields a tied tensor once


def base_bytes(model: nn.Module, quantized: bool) -> int:
    """The base weights' bytes, with the quantizable linears in NF4 if `quantized`."""
    quant = {f"{n}.weight" for n in _quantizable(model)} if quantized else set()
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for name, p in _unique_parameters(model):
        total += nf4_bytes(p.numel()) if name in quant else p.numel() * p.element_size()
    return total + (nf4_code_book_bytes() if quant else 0)


def activation_bytes(config: Any, options: MemoryOptions, layers: int) -> int:
    """The estimate described in the module docstring."""
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    tokens = options.batch * options.seq
    width = torch.tensor([], dtype=options.dtype).element_size()
    per_layer = tokens * (10 * hidden + 3 * inter) * width
    if options.checkpointing:
        return layers * tokens * hidden * width + per_layer
    return layers * per_layer


def estimate(name_or_path: str, methods: tuple[str, ...], options: MemoryOptions) -> Any:
    """(config, {method: MemoryEstimate}) for the model `name_or_path`, from its config only."""
    config = model_config(name_or_path)
    model = meta_model(config, options.dtype)
    layers = int(getattr(config, "num_hidden_layers", 1))
    activations = activation_bytes(config, options, layers)
    out = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        est = MemoryEstimate(method)
        est.lines["base weights"] = base_bytes(model, quantized=method == "qlora")
        if method == "full":
            trainable = [p for _, p in _unique_parameters(model)]
            est.lines["adapter weights"] = 0
            width = options.dtype
        else:
            width = torch.float32 if method == "qlora" else options.dtype
            shapes = [(m.in_features, m.out_features) for m in _targets(model, options)]
            trainable = [torch.empty(options.r * (i + o), device="meta") for i, o in shapes]
            est.lines["adapter weights"] = _bytes(trainable, width)
        est.lines["gradients"] = _bytes(trainable, width)
        est.lines["optimizer state"] = 2 * _bytes(trainable, width)
        est.lines["activations (est.)"] = activations
        out[method] = est
    return config, out


def _bytes(tensors: list[torch.Tensor], dtype: torch.dtype) -> int:
    width = torch.tensor([], dtype=dtype).element_size()
    return sum(t.numel() for t in tensors) * width


def parameter_count(config: Any) -> int:
    """The model's parameter count (tied tensors once), from its config."""
    model = meta_model(config, torch.float32)
    return sum(p.numel() for _, p in _unique_parameters(model))


def render(
    name: str, config: Any, estimates: dict[str, MemoryEstimate], options: MemoryOptions
) -> str:
    """The table `tilpass memory` prints: one column per method, GiB."""
    params = parameter_count(config)
    dtype = str(options.dtype).removeprefix("torch.")
    targets = options.target_modules
    target_text = "all linear layers" if targets == "all-linear" else f"{targets}"
    lines = [
        f"tilpass memory: {name} ({params / 1e9:.2f} B parameters), batch {options.batch} x "
        f"{options.seq} tokens, {dtype}, LoRA r={options.r} on {target_text}"
        + (", activation checkpointing" if options.checkpointing else ""),
        "",
        f"{'GiB':<20}" + "".join(f"{m:>12}" for m in estimates),
    ]
    for line in (*LINES, "total"):
        values = [e.total if line == "total" else e.lines[line] for e in estimates.values()]
        lines.append(f"{line:<20}" + "".join(f"{v / 2**30:>12.3f}" for v in values))
    lines += [
        "",
        "qlora: linear layers in NF4 with double quantization (bitsandbytes), adapter in "
        "float32; lora and full: base in " + dtype + ". Optimizer: AdamW (two moments).",
    ]
    return "\n".join(lines)
