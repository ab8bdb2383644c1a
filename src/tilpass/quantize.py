"""Quantized base weights through bitsandbytes: QLoRA's 4-bit NormalFloat base, under any method.

QLoRA (Dettmers et al., 2023) stores the frozen base weights in 4-bit NormalFloat (NF4): each
block of 64 weights keeps its absolute maximum, and every weight is the nearest of 16 values
(the quantiles of a standard normal, scaled to [-1, 1]) times that maximum. Double
quantization stores the block maxima again in 8 bits (blocks of 256, around their mean), so a
weight costs 4 + 8/64 + 32/(64 * 256) ~= 4.127 bits. Compute runs in float32 or bfloat16 on the
dequantized weight; the adapter trains on top in full precision.

`quantize_model` replaces, in place, every plain `nn.Linear` of a model with bitsandbytes'
`Linear4bit` (NF4 or FP4) or `Linear8bitLt` (int8). As in the paper, the output head, the
embeddings and the norms stay in full precision; any other linear-like type (a linear subclass
whose forward tilpass does not know, GPT-2's transposed `Conv1D`) is skipped and counted,
never converted. The adapter layers
then wrap the quantized modules like any other linear layer (they call them for the base
result); `tilpass.layers.dense_weight` is the one place that dequantizes, for merging and DoRA.

bitsandbytes is imported only when a model is quantized, so tilpass runs without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tilpass.errors import TilpassError

QUANT_TYPES = ("nf4", "fp4", "int8")
"""The formats `quantize_model` offers (`--quantize`)."""

FOUR_BIT = ("nf4", "fp4")
BLOCKSIZE = 64
"""Weights per 4-bit block (QLoRA's choice); the block maxima are quantized in blocks of 256."""

INSTALL_COMMAND = "pip install bitsandbytes"

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Names the command line and YAML accept for the compute dtype."""

_REQUANTIZE: contextvars.ContextVar[bool] = contextvars.ContextVar("requantize", default=False)


class QuantizationError(TilpassError, ImportError):
    """bitsandbytes is missing or cannot run here, or a format is not offered on this device."""


class RequantizeError(TilpassError, RuntimeError):
    """A merge into a quantized base was asked for without saying that re-quantizing is wanted."""


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How the base is quantized.

    Attributes:
        quant_type: nf4 | fp4 (4-bit, blocks of 64) | int8 (LLM.int8, per row).
        compute_dtype: the dtype the base's matmul runs in (float32 or bfloat16).
        double_quant: quantize the 4-bit block maxima again to 8 bits (QLoRA's default).
        skip_modules: module names (or dotted suffixes) to keep in full precision besides the
            output head.
    """

    quant_type: str = "nf4"
    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"quantize: unknown format {self.quant_type!r}; choose one of "
                f"{', '.join(QUANT_TYPES)}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES.values():
            raise ValueError(
                f"quantize: compute dtype {self.compute_dtype} is not supported; use "
                f"{' or '.join(COMPUTE_DTYPES)}"
            )

    def describe(self) -> str:
        """One line for banners and model cards."""
        dtype = str(self.compute_dtype).removeprefix("torch.")
        if self.quant_type == "int8":
            return f"int8 (LLM.int8, per-row scales), compute in {dtype}"
        double = ", double-quantized block scales" if self.double_quant else ""
        kind = self.quant_type.upper()
        return f"4-bit {kind} (blocks of {BLOCKSIZE}{double}), compute in {dtype}"


@dataclasses.dataclass
class QuantizeReport:
    """What `quantize_model` did: which modules it quantized, kept and skipped (with why)."""

    config: QuantizeConfig
    quantized: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)  # by rule: head, skip_modules
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> type name

    def summary(self) -> str:
        """The banner line: format, counts, and what stayed in full precision."""
        text = (
            f"base quantized to {self.config.describe()}: {len(self.quantized)} linear layers; "
            f"kept in full precision: embeddings, norms"
        )
        if self.kept:
            text += ", " + ", ".join(self.kept)
        if self.skipped:
            kinds = sorted(set(self.skipped.values()))
            text += (
                f"; skipped {len(self.skipped)} module(s) of a type that cannot be quantized "
                f"({', '.join(kinds)})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        """For the change record."""
        return {
            "summary": self.summary(),
            "format": self.config.quant_type,
            "description": self.config.describe(),
            "library": "bitsandbytes",
            "quantized_modules": len(self.quantized),
            "kept": list(self.kept),
            "skipped": dict(self.skipped),
        }


def bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or raise one clear error with the install command."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising at import
        raise QuantizationError(
            f"quantizing the base model needs bitsandbytes, which {_why(exc)}. Install it with: "
            f"{INSTALL_COMMAND}"
        ) from exc
    return bnb


def _why(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return "is not installed"
    return f"failed to import ({type(exc).__name__}: {exc})"


def check_supported(quant_type: str, device: torch.device) -> None:
    """Quantize and run a tiny layer in `quant_type` on `device`, or raise naming the device.

    bitsandbytes' back-ends differ per device; a format whose kernels are missing here fails
    now, with one message, instead of deep inside the first forward.
    """
    bnb = bitsandbytes()
    layer = nn.Linear(64, 8, bias=False, device="meta")  # no random init: leave the RNG alone
    layer.weight = nn.Parameter(torch.linspace(-1, 1, 512, device=device).view(8, 64))
    try:
        quantized = quantize_linear(layer, QuantizeConfig(quant_type), bnb)
        with torch.no_grad():
            quantized(torch.ones(2, 64, device=device))
    except Exception as exc:
        raise QuantizationError(
            f"--quantize {quant_type} is not supported on this device ({device}) by "
            f"bitsandbytes {getattr(bnb, '__version__', '?')}: {type(exc).__name__}: {exc}. "
            f"Choose another format ({', '.join(QUANT_TYPES)}) or run without --quantize."
        ) from exc


def quantize_model(model: nn.Module, config: QuantizeConfig | None = None) -> QuantizeReport:
    """Replace the model's linear layers by quantized ones, in place; returns what it did.

    The output head (`get_output_embeddings()`, or modules named `lm_head`) and modules in
    `config.skip_modules` stay as they are, as do embeddings and norms (not linear). Each layer
    is quantized and swapped in before the next, so peak memory grows by one layer, not a copy
    of the model.
    """
    config = config or QuantizeConfig()
    bnb = bitsandbytes()
    device = _device_of(model)
    check_supported(config.quant_type, device)
    report = QuantizeReport(config)
    keep = _output_head_names(model)
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Linear | _conv1d_type()):
            continue
        if name in keep or _listed(name, config.skip_modules):
            report.kept.append(name)
        elif is_quantized_module(module):
            report.skipped[name] = f"{type(module).__name__}, already quantized"
        elif type(module) is not nn.Linear:  # its forward may not be x W^T + b
            report.skipped[name] = type(module).__name__
        else:
            _replace(model, name, quantize_linear(module, config, bnb))
            report.quantized.append(name)
    share_code_books(model)
    return report


def share_code_books(model: nn.Module) -> int:
    """Make the quantized layers share one copy of each code book; returns the bytes freed.

    bitsandbytes gives every layer its own copy of two constant tables (the 16 NF4 / FP4
    values and the 256 values of the scales' 8-bit code): 1,088 bytes a layer, a tenth of a
    bit per weight on a small model. Equal tables are replaced by the first one seen, so the
    stored bits per weight are the format's (4.127 for NF4 with double quantization).
    """
    tables = _SharedTables()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        state.code = tables.one(state.code)
        if state.nested:
            state.state2.code = tables.one(state.state2.code)
    return tables.freed


class _SharedTables:
    """Equal constant tables, by value: the first one seen stands for the rest."""

    def __init__(self) -> None:
        self.first: dict[tuple[Any, ...], torch.Tensor] = {}
        self.freed = 0

    def one(self, table: torch.Tensor) -> torch.Tensor:
        """The first table equal to `table` (itself if it is the first)."""
        key = (table.device, table.dtype, tuple(table.shape), tuple(table.flatten().tolist()))
        first = self.first.setdefault(key, table)
        if first is not table and first.data_ptr() != table.data_ptr():
            self.freed += table.numel() * table.element_size()
        return first


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _conv1d_type() -> type:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return nn.Linear
    return Conv1D


def _listed(name: str, entries: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_linear(
    module: nn.Module, config: QuantizeConfig, bnb: ModuleType | None = None
) -> nn.Module:
    """A bitsandbytes layer computing what the `nn.Linear` `module` computes, quantized.

    The weight is quantized from its own dtype; the bias stays in full precision, in the
    compute dtype.
    """
    bnb = bnb or bitsandbytes()
    weight = module.weight.detach()
    out_features, in_features = weight.shape
    has_bias = module.bias is not None
    device = weight.device
    if config.quant_type in FOUR_BIT:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            module=layer,
        ).to(device)  # bitsandbytes quantizes on the first move to a device
    else:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(
            weight.contiguous(), requires_grad=False, has_fp16_weights=False
        ).to(device)
    if has_bias:
        bias = module.bias.detach().to(config.compute_dtype)
        layer.bias = nn.Parameter(bias, requires_grad=False)
    layer.train(module.training)
    return layer


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized linear layer by an `nn.Linear` holding its dequantized weight in
    `dtype`, in place (after a merge into a quantized base, for saving); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Linear) or not is_quantized_module(module):
            continue
        dense = dequantize_weight(module).to(dtype)
        out_features, in_features = dense.shape
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(dense, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        linear.train(module.training)
        _replace(model, name, linear)
        count += 1
    return count


def is_quantized_module(module: nn.Module) -> bool:
    """A module whose `weight` is stored in an integer format (bitsandbytes' 4- and 8-bit)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


BACKEND_NAMES = {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}
"""bitsandbytes' module classes and the backend names PEFT's status reports give them."""


def backend_name(module: nn.Module) -> str | None:
    """The quantization backend of `module` as PEFT's status names it ("bnb 4bit"), or None
    for a module that is not quantized (or quantized by a library tilpass does not know)."""
    kind = type(module)
    if not (kind.__module__ or "").startswith("bitsandbytes"):
        return None
    return next(
        (BACKEND_NAMES[c.__name__] for c in kind.__mro__ if c.__name__ in BACKEND_NAMES), None
    )


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The quantized module's weight as a dense (out, in) float tensor (a new tensor).

    4-bit weights come back in the dtype they were quantized from; int8 weights in float32.
    """
    bnb = bitsandbytes()
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return bnb.functional.dequantize_4bit(weight.data, state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(module.state, "SCB", None)
    if scales is None:
        raise TypeError(
            f"cannot dequantize the weight of {type(module).__name__}: it holds neither a 4-bit "
            "quant_state nor int8 row scales"
        )
    return weight.data.float() * (scales.float() / 127).view(-1, 1)  # (out, in)


def code_book(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 values a 4-bit weight indexes (times its block's scale), as bitsandbytes uses."""
    return bitsandbytes().functional.get_4bit_type(quant_type, device="cpu")


def block_scales(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight's scale (absolute maximum) per block of 64, as dequantization uses it:
    with double quantization, the 8-bit scales dequantized and the offset added back."""
    state = weight.quant_state
    if not state.nested:
        return state.absmax.float()
    scales = bitsandbytes().functional.dequantize_blockwise(state.absmax, state.state2)
    return scales.float() + state.offset


@contextlib.contextmanager
def allow_requantize() -> Iterator[None]:
    """Within the block, merging into a quantized base re-quantizes the merged weight.

    Merging into a quantized base cannot be exact: the merged weight is rounded to the 4-bit
    grid again, which changes the model's outputs. So it is refused unless asked for here
    (`tilpass merge --requantize`); merging into the full-precision base is exact.
    """
    token = _REQUANTIZE.set(True)
    try:
        yield
    finally:
        _REQUANTIZE.reset(token)


def requantized_weight(module: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    """A new quantized weight for `module` from the dense (out, in) tensor `dense`.

    Raises `RequantizeError` outside `allow_requantize()`; nothing is changed then.
    """
    if not _REQUANTIZE.get():
        raise RequantizeError(
            f"merging into a quantized base ({type(module).__name__}) re-quantizes the weights "
            "and changes the model's outputs. Merge into the full-precision base instead (load "
            "it without quantize; `tilpass merge` does), or ask for it explicitly: "
            "`with tilpass.quantize.allow_requantize(): model.merge_and_unload()`, or "
            "`tilpass merge --quantize FORMAT --requantize`"
        )
    bnb = bitsandbytes()
    old = module.weight
    state = getattr(old, "quant_state", None)
    if state is not None:
        source = dense.to(state.dtype).contiguous()
        param = bnb.nn.Params4bit(
            source,
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            module=module,
        )
        return param.to(old.device)
    source = dense.to(torch.float16 if old.device.type == "cuda" else torch.float32)
    param = bnb.nn.Int8Params(source.contiguous(), requires_grad=False, has_fp16_weights=False)
    return param.to(old.device)


def logical_numel(tensor: torch.Tensor) -> int:
    """How many weights a tensor holds: a packed 4-bit weight holds two per byte."""
    state = getattr(tensor, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return tensor.numel()


@dataclasses.dataclass(frozen=True)
class BaseStorage:
    """The resident size of a model's base weights, measured from its tensors.

    Attributes:
        total_bytes: every base parameter and buffer, quantization scales and code books
            included; a tensor shared by several modules (tied embeddings) counts once.
        quantized_bytes: the quantized weights with their scales and code books.
        quantized_weights: how many weights those hold.
        code_book_bytes: the part of `quantized_bytes` that is code books (the 16 NF4 values
            and the 256 values of the scales' 8-bit code; one shared copy after
            `quantize_model`, one per layer as bitsandbytes makes them otherwise).
    """

    total_bytes: int
    quantized_bytes: int
    quantized_weights: int
    code_book_bytes: int = 0

    @property
    def bits_per_quantized_weight(self) -> float | None:
        """Stored bits per quantized weight, data and scales (NF4 with double quantization:
        4 + 8/64 + 32/(64 * 256) = 4.127), without the code books."""
        if not self.quantized_weights:
            return None
        return 8 * (self.quantized_bytes - self.code_book_bytes) / self.quantized_weights

    @property
    def bits_with_code_books(self) -> float | None:
        """Stored bits per quantized weight, everything included."""
        if not self.quantized_weights:
            return None
        return 8 * self.quantized_bytes / self.quantized_weights

    def describe(self) -> str:
        """One line: the base's bytes and, if any layer is quantized, its bits per weight."""
        line = f"base weights: {self.total_bytes / 2**20:,.1f} MiB resident"
        bits = self.bits_per_quantized_weight
        if bits is not None:
            line += (
                f"; quantized layers: {bits:.3f} bits per weight ({self.bits_with_code_books:.3f}"
                f" with the code books) over {self.quantized_weights:,d} weights "
                f"({self.quantized_bytes / 2**20:,.1f} MiB)"
            )
        return line


def measure_storage(model: nn.Module, exclude: set[int] | None = None) -> BaseStorage:
    """Measure the base's resident bytes from its tensors; `exclude` holds ids of tensors that
    are not the base's (the adapters' parameters)."""
    exclude = exclude or set()
    seen: set[int] = set()
    seen_tables: set[int] = set()
    total = quantized = weights = tables = 0
    for module in model.modules():
        tensors = [
            *module.parameters(recurse=False),
            *(b for b in module.buffers(recurse=False) if b is not None),
        ]
        for tensor in tensors:
            if id(tensor) in exclude:
                continue
            extra = _quant_tensors(module, tensor)
            size = sum(_new_bytes(t, seen) for t in [tensor, *extra])
            total += size
            if extra:
                quantized += size
                weights += logical_numel(tensor)
                tables += sum(_new_bytes(t, seen_tables) for t in _code_books(tensor))
    return BaseStorage(total, quantized, weights, tables)


def _code_books(tensor: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(tensor, "quant_state", None)
    if state is None:
        return []
    return [state.code, state.state2.code] if state.nested else [state.code]


def _quant_tensors(module: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The scales and code books stored beside a quantized weight (none for a plain tensor)."""
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        parts = [state.absmax, state.code]
        if state.nested:
            parts += [state.offset, state.state2.absmax, state.state2.code]
        return [p for p in parts if isinstance(p, torch.Tensor)]
    if tensor is getattr(module, "weight", None) and tensor.dtype == torch.int8:
        scales = getattr(tensor, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        return [scales] if isinstance(scales, torch.Tensor) else []
    return []


def _new_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """The tensor's bytes, or 0 if its storage was counted already."""
    meta = tensor.device.type == "meta"
    key = hash((id(tensor),) if meta else (tensor.data_ptr(), tensor.numel(), tensor.dtype))
    if key in seen:
        return 0
    seen.add(key)
    return tensor.numel() * tensor.element_size()
