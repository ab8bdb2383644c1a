"""What an adapter changes: its modules, ranks, sizes and, given the base, each weight delta.

Without a base model only the adapter's two files are read (no model is built): the method,
the adapted modules grouped by layer and kind, each module's tensors and rank, the trainable
parameters, the file's size and dtypes. With a base model the adapter is loaded onto it and,
for every layer that can merge, the change is measured as merged weight minus base weight,
using the layer's own merge rule (so LoRA, rsLoRA, DoRA and (IA)^3 all count what they really
do): its Frobenius norm relative to the base weight, and its effective rank, the number of
singular directions that hold 90% / 99% of its energy (sum of squared singular values).
Methods that add modules or inputs instead (bottleneck adapters, prompt tuning) are described
by what they add.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tilpass.adapter_files import PICKLE_NAME, WEIGHTS_NAME
from tilpass.config import read_config_dict
from tilpass.errors import AdapterFileError
from tilpass.methods import UnknownMethodError, method_for_peft_type

PREFIX = "base_model.model."  # PEFT's key prefix for a model's adapter tensors
ENERGY_LEVELS = (0.90, 0.99)
LOW_USE_FRACTION = 0.25
"""A module "uses far less rank than allotted" when 90% of its change fits in r/4 directions."""
DESCRIBED_SETTINGS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "feedforward_modules",
    "modules_to_save",
    "bottleneck_size",
    "reduction_factor",
    "placement",
    "non_linearity",
    "num_virtual_tokens",
    "token_dim",
)
"""Config fields that say what an adapter adds (those present in its config are shown)."""


class InspectError(AdapterFileError):
    """A directory that is not an adapter, or an adapter that does not fit the given base."""


@dataclass
class ModuleReport:
    """One adapted module (or, with an empty path, the tensors of the model's inputs).

    Attributes:
        path: the module's path in the base model (`model.layers.0.self_attn.q_proj`).
        layer: the transformer block's index, or None outside the numbered blocks.
        kind: the module's own name (`q_proj`), or "input" for prompt embeddings.
        tensors: file key suffix -> shape.
        rank: the low-rank update's rank (the first dimension of its `*_A` factor), if any.
        width: the size of a bottleneck (the first dimension of its down projection), if any.
        relative_norm: |merged - base|_F / |base|_F (with a base model).
        effective_rank: energy level ("90%", "99%") -> the number of singular directions.
    """

    path: str
    layer: int | None
    kind: str
    tensors: dict[str, list[int]] = field(default_factory=dict)
    parameters: int = 0
    rank: int | None = None
    width: int | None = None
    relative_norm: float | None = None
    delta_norm: float | None = None
    effective_rank: dict[str, int] = field(default_factory=dict)


@dataclass
class AdapterReport:
    """Everything `tilpass inspect` says about one adapter directory."""

    directory: str
    method: str
    peft_type: str
    base_model: str | None
    file: str
    file_bytes: int
    dtypes: dict[str, int]
    trainable_parameters: int
    settings: dict[str, Any]
    modules: list[ModuleReport]
    virtual_tokens: int | None = None
    base_checked: str | None = None
    hints: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return asdict(self)


def split_key(key: str, prefix: str) -> tuple[str, str]:
    """A file key -> (module path, tensor suffix).

    The suffix starts at the first component carrying the method's parameter prefix
    (`lora_A.weight`, `ia3_l`); without one, a trailing `X.weight` / `X.bias` is a submodule
    the method added (a bottleneck's `adapter_down.weight`). Keys without a module path
    (`prompt_embeddings`) belong to the model's inputs.
    """
    key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    parts = key.split(".")
    if len(parts) == 1:
        return "", key
    if prefix:
        for i, part in enumerate(parts):
            if part.startswith(prefix):
                return ".".join(parts[:i]), ".".join(parts[i:])
        return ".".join(parts[:-1]), parts[-1]  # a full copy (modules_to_save)
    cut = 2 if parts[-1] in ("weight", "bias") and len(parts) > 2 else 1
    return ".".join(parts[:-cut]), ".".join(parts[-cut:])


def _module_report(path: str, shapes: dict[str, list[int]]) -> ModuleReport:
    numbers = [int(p) for p in path.split(".") if p.isdigit()]
    kind = path.rsplit(".", 1)[-1] if path else "input"
    report = ModuleReport(path=path, layer=numbers[0] if numbers else None, kind=kind)
    report.tensors = dict(sorted(shapes.items()))
    for suffix, shape in shapes.items():
        count = 1
        for size in shape:
            count *= size
        report.parameters += count
        first = suffix.split(".")[0]
        if first.endswith("_A") and shape:
            report.rank = shape[0]
        if "down" in first and suffix.endswith("weight") and shape:
            report.width = shape[0]
    return report


def read_file_tensors(directory: Path) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The adapter file's keys with their shapes, and a count of tensors per dtype (the
    safetensors header only; no tensor is loaded)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise InspectError(
                f"{directory / PICKLE_NAME}: a pickle file; tilpass inspects safetensors only. "
                f"Convert it to {WEIGHTS_NAME} first."
            )
        raise InspectError(
            f"{directory}: no {WEIGHTS_NAME}; an adapter directory holds adapter_config.json "
            f"and {WEIGHTS_NAME} (the PEFT layout)"
        )
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    try:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = handle.get_slice(key)
                shapes[key] = list(piece.get_shape())
                dtype = str(piece.get_dtype())
                dtypes[dtype] = dtypes.get(dtype, 0) + 1
    except (SafetensorError, OSError, ValueError) as exc:
        raise InspectError(
            f"{path}: cannot be read as safetensors ({exc}); the file is truncated or corrupt"
        ) from exc
    return shapes, dtypes


def describe_adapter(directory: str | Path) -> AdapterReport:
    """The adapter's structure from its files alone (fast: no model is loaded)."""
    directory = Path(directory)
    config = read_config_dict(directory)
    try:
        method = method_for_peft_type(str(config["peft_type"]))
    except UnknownMethodError as exc:
        raise InspectError(f"{directory / 'adapter_config.json'}: {exc}") from None
    shapes, dtypes = read_file_tensors(directory)
    grouped: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        path, suffix = split_key(key, method.prefix)
        grouped.setdefault(path, {})[suffix] = shape
    modules = [_module_report(path, tensors) for path, tensors in grouped.items()]
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.path))
    settings = {
        k: config[k] for k in DESCRIBED_SETTINGS if config.get(k) not in (None, {}, [], False)
    }
    virtual = config.get("num_virtual_tokens") if "" in grouped else None
    return AdapterReport(
        directory=str(directory),
        method=method.name,
        peft_type=method.peft_type,
        base_model=config.get("base_model_name_or_path"),
        file=WEIGHTS_NAME,
        file_bytes=(directory / WEIGHTS_NAME).stat().st_size,
        dtypes=dtypes,
        trainable_parameters=sum(m.parameters for m in modules),
        settings=settings,
        modules=modules,
        virtual_tokens=int(virtual) if virtual is not None else None,
    )


def effective_rank(delta: torch.Tensor, energy: float) -> int:
    """The fewest singular directions of `delta` that hold `energy` of its squared norm."""
    matrix = delta.reshape(delta.shape[0], -1).to(torch.float64)
    values = torch.linalg.svdvals(matrix)
    total = float((values**2).sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(values**2, 0) / total
    # A relative slack of 1e-12 keeps an exact rank-k change at k despite rounding.
    return int((cumulative < energy - 1e-12).sum()) + 1


def load_onto_base(directory: Path, base: str) -> Any:
    """The base model (full precision) with the adapter loaded, as an `AdaptedModel`."""
    from transformers import AutoModelForCausalLM

    from tilpass.model import AdaptedModel
    from tilpass.pretrained import resolve_model_path

    model_dir = resolve_model_path(base)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    try:
        return AdaptedModel.from_pretrained(model.eval(), directory)
    except AdapterFileError as exc:
        raise InspectError(f"{directory} does not fit the base model {base}: {exc}") from exc


@torch.no_grad()
def weight_deltas(adapted: Any, name: str = "default") -> dict[str, tuple[torch.Tensor, Any]]:
    """Module path -> (merged - base weight, base weight), in float64, for every layer of
    adapter `name` that merges; computed with each layer's own merge rule."""
    from tilpass.inject import adapter_layers

    out: dict[str, tuple[torch.Tensor, Any]] = {}
    for path, layer in adapter_layers(adapted.base_model):
        if not layer.MERGEABLE or name not in layer.specs:
            continue
        layer.to(torch.float64)
        targets = [t for t in layer.merge_targets() if getattr(layer, t, None) is not None]
        before = {t: layer.original_tensor(t).detach().clone() for t in targets}
        layer.merge([name])
        after = {t: getattr(layer.base_layer, t).detach().clone() for t in targets}
        layer.unmerge()
        for target in targets:
            key = path if target == "weight" else f"{path}.{target}"
            out[key] = (after[target] - before[target], before[target])
    return out


def measure_changes(report: AdapterReport, base: str) -> None:
    """Fill each module's relative norm and effective ranks from the base model `base`."""
    adapted = load_onto_base(Path(report.directory), base)
    deltas = weight_deltas(adapted)
    for module in report.modules:
        found = deltas.get(module.path) if module.path else None
        if found is None:
            continue
        delta, weight = found
        module.delta_norm = float(torch.linalg.vector_norm(delta))
        base_norm = float(torch.linalg.vector_norm(weight))
        module.relative_norm = module.delta_norm / base_norm if base_norm else float("inf")
        module.effective_rank = {
            f"{round(level * 100)}%": effective_rank(delta, level) for level in ENERGY_LEVELS
        }
    report.base_checked = base
    report.hints = rank_hints(report)


def rank_hints(report: AdapterReport) -> list[str]:
    """Advice on `r` when most low-rank modules use far less of it, or all of it; and a note
    on modules whose change is zero."""
    changed = [m for m in report.modules if m.effective_rank]
    unchanged = [m for m in changed if m.delta_norm == 0.0]
    hints = []
    if unchanged:
        hints.append(
            f"{len(unchanged)} of {len(changed)} modules change nothing (an untrained adapter, "
            "or one whose update is still zero)"
        )
    measured = [m for m in changed if m.rank and m.delta_norm]
    if not measured:
        return hints
    if report.settings.get("use_dora"):
        return [
            *hints,
            "DoRA rescales each weight's rows, so its change is not low-rank by construction; "
            "effective ranks are shown but say little about r",
        ]
    low = [m for m in measured if m.effective_rank["90%"] <= max(1, m.rank * LOW_USE_FRACTION)]
    full = [m for m in measured if m.effective_rank["90%"] >= m.rank]
    if 2 * len(low) > len(measured):
        needed = sorted(m.effective_rank["99%"] for m in measured)[len(measured) // 2]
        suggestion = 1 << max(needed - 1, 0).bit_length()  # the next power of two
        hints.append(
            f"{len(low)} of {len(measured)} modules hold 90% of their change in at most a "
            f"quarter of their rank, and half need at most {needed} directions for 99%: r "
            f"could be lowered (to about {suggestion}) with little loss"
        )
    if 2 * len(full) > len(measured):
        hints.append(
            f"{len(full)} of {len(measured)} modules need their whole rank for 90% of their "
            "change: r may be too low for this task; try doubling it"
        )
    return hints


def inspect_adapter(directory: str | Path, base: str | None = None) -> AdapterReport:
    """`describe_adapter`, plus the weight changes measured against `base` when given."""
    report = describe_adapter(directory)
    if base is not None:
        measure_changes(report, base)
    return report


def rank_summary(modules: list[ModuleReport]) -> str:
    """The modules' ranks (or bottleneck sizes) in short: \"r=8\", \"r=2/8\", \"size=2\"."""
    ranks = sorted({m.rank for m in modules if m.rank is not None})
    widths = sorted({m.width for m in modules if m.width is not None})
    if ranks:
        return "r=" + ("/".join(map(str, ranks)) if len(ranks) > 1 else str(ranks[0]))
    if widths:
        return "size=" + "/".join(map(str, widths))
    return "-"


def layer_span(modules: list[ModuleReport]) -> str:
    """The block indices the modules sit in, in short: \"0-23\", \"0,5\", or \"-\"."""
    numbers = sorted({m.layer for m in modules if m.layer is not None})
    if not numbers:
        return "-"
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 1:
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))
