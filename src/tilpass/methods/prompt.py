"""Prompt tuning: learned virtual tokens prepended to every sequence (Lester et al., 2021).

For an input of T token embeddings E (B, T, H) and an adapter with P virtual-token
embeddings V (P, H), the base model runs on

    inputs_embeds = [V ; E]                     (B, P + T, H)
    attention_mask = [1 ... 1 ; mask]           (B, P + T)
    position_ids   = [0 .. P-1 ; P + positions] (B, P + T)
    labels         = [-100 ... -100 ; labels]   (B, P + T)

and returns logits for all P + T positions, as PEFT does. In a mixed batch each row gets its
own adapter's tokens; rows with fewer (or none: another method's adapter, the base model) are
left-padded with masked positions, so every row sees exactly its own prefix. Nothing is folded
into weights: merging keeps the virtual tokens. Files are PEFT's: `peft_type: "PROMPT_TUNING"`,
one tensor `prompt_embeddings` of shape (num_virtual_tokens, token_dim).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tilpass.config import AdapterConfig
from tilpass.config_fields import opt
from tilpass.errors import TargetModulesError
from tilpass.layers import AdapterLayer
from tilpass.methods.registry import Method

IGNORE_INDEX = -100
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass
class PromptFields:
    """Prompt tuning's fields with PEFT's names, shared by `PromptTuningConfig` and the hybrid
    `LoraPromptConfig` (a base class of both, before their other base)."""

    task_type: str | None = "CAUSAL_LM"
    num_virtual_tokens: int = opt(20, "Virtual tokens prepended to every sequence.")
    prompt_tuning_init: str = opt("RANDOM", "RANDOM, TEXT or SAMPLE_VOCAB.")
    prompt_tuning_init_text: str | None = opt(None, "Text whose embeddings start the prompt.")
    tokenizer_name_or_path: str | None = opt(None, "Tokenizer for prompt_tuning_init_text.")
    tokenizer_kwargs: dict[str, Any] | None = opt(None, "Arguments for that tokenizer.")
    token_dim: int | None = opt(None, "Embedding width (default: the model's).")
    num_transformer_submodules: int | None = opt(None, "1 for decoder-only models (filled in).")
    num_attention_heads: int | None = opt(None, "The model's (filled in, as PEFT records it).")
    num_layers: int | None = opt(None, "The model's (filled in, as PEFT records it).")


@dataclasses.dataclass
class PromptTuningConfig(PromptFields, AdapterConfig):
    """Prompt tuning settings, with PEFT's field names and meanings.

    Attributes:
        num_virtual_tokens: how many virtual tokens are prepended.
        prompt_tuning_init: RANDOM (normal noise), TEXT (the embeddings of
            `prompt_tuning_init_text`, repeated or cut to length) or SAMPLE_VOCAB (embeddings of
            random vocabulary tokens).
        token_dim: the embedding width; filled in from the model when unset.
    """

    PEFT_TYPE = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        self.prompt_tuning_init = str(self.prompt_tuning_init).upper()
        if self.prompt_tuning_init not in INITS:
            raise ValueError(
                f"prompt_tuning_init {self.prompt_tuning_init!r} is not one of {', '.join(INITS)}"
            )
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens!r}")
        if self.prompt_tuning_init == "TEXT" and not (
            self.prompt_tuning_init_text and self.tokenizer_name_or_path
        ):
            raise ValueError(
                "prompt_tuning_init TEXT needs prompt_tuning_init_text and tokenizer_name_or_path"
            )

    def layer_spec(self, module_name: str, initialize: bool) -> PromptSpec:
        if not initialize:  # the tensor is loaded next; no tokenizer needed
            return PromptSpec(self.num_virtual_tokens, None)
        return PromptSpec(self.num_virtual_tokens, self.prompt_tuning_init, self.init_ids())

    def init_ids(self) -> tuple[int, ...] | None:
        """The token ids TEXT initialisation starts from (repeated or cut to length)."""
        if self.prompt_tuning_init != "TEXT":
            return None
        from transformers import AutoTokenizer

        assert self.tokenizer_name_or_path is not None
        kwargs = dict(self.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **kwargs)
        ids = list(tokenizer(self.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenizes to no tokens")
        repeats = -(-self.num_virtual_tokens // len(ids))
        return tuple((ids * repeats)[: self.num_virtual_tokens])

    def describe_model(self, model: nn.Module, embedding: nn.Module) -> None:
        """Fill in the model-derived fields PEFT records (token_dim and friends)."""
        width = int(embedding.weight.shape[1])
        if self.token_dim is None:
            self.token_dim = width
        elif self.token_dim != width:
            raise ValueError(
                f"token_dim is {self.token_dim} but the model's embeddings are {width} wide"
            )
        config = getattr(model, "config", None)
        self.num_transformer_submodules = self.num_transformer_submodules or 1
        if self.num_layers is None:
            self.num_layers = getattr(config, "num_hidden_layers", None)
        if self.num_attention_heads is None:
            self.num_attention_heads = getattr(config, "num_attention_heads", None)


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One adapter's settings in the prompt layer."""

    num_virtual_tokens: int
    init: str | None  # None: allocate only (the tensor is loaded next)
    init_ids: tuple[int, ...] | None = None


class PromptEmbedding(AdapterLayer):
    """Virtual tokens over the model's input embedding; the rule is in the module docstring.

    Its forward is the wrapped embedding's, unchanged: the tokens are prepended by
    `extend_inputs`, which the model calls once per forward (and once per `generate`).
    """

    STORES = ("prompt_embeddings",)
    MERGEABLE = True  # merging folds nothing in and keeps the tokens (see STAYS_WHEN_MERGED)
    STAYS_WHEN_MERGED = True
    EXTENDS_INPUTS = True
    ROOT_KEYS = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.prompt_embeddings = nn.ParameterDict()

    def create(self, name: str, spec: PromptSpec) -> None:
        weight = self.base_layer.weight  # (V, H)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        shape = (spec.num_virtual_tokens, weight.shape[1])
        if spec.init == "TEXT" and spec.init_ids is not None:
            ids = torch.tensor(spec.init_ids, device=weight.device)
            values = weight.detach()[ids].to(dtype).clone()
        elif spec.init == "SAMPLE_VOCAB":
            ids = torch.randint(0, weight.shape[0], (shape[0],), device=weight.device)
            values = weight.detach()[ids].to(dtype).clone()
        elif spec.init is None:
            values = torch.empty(shape, dtype=dtype, device=weight.device)
        else:  # RANDOM, as torch.nn.Embedding initialises (PEFT's choice)
            values = torch.randn(shape, dtype=dtype, device=weight.device)
        self.prompt_embeddings[name] = nn.Parameter(values)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings[name]} if name in self.specs else {}

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.base_forward(x, *args, **kwargs)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Nothing to fold in: the virtual tokens stay (a no-op, so merging is idempotent)."""

    # -- extending the inputs ---------------------------------------------------------------
    def extend_inputs(self, inputs: dict[str, Any], row_ids: torch.Tensor | None) -> dict[str, Any]:
        if self.disabled or not self.specs:
            return inputs
        batch = _batch_of(inputs)
        slots = self.row_slots(row_ids, batch)
        if slots is None:
            return inputs
        device = self.base_layer.weight.device
        table, counts = self.prompt_table(device)
        slots = slots.to(device)
        count = counts[slots]  # (B,) virtual tokens of each row
        width = int(count.max())
        if width == 0:
            return inputs
        pad = width - count  # (B,) masked positions before each row's tokens
        columns = torch.arange(width, device=device)
        prefix_mask = columns[None, :] >= pad[:, None]  # (B, P)
        cache = inputs.get("cache", inputs.get("past_key_values"))  # new and old names
        if _cache_length(cache) > 0:
            return _decode_step(inputs, prefix_mask, count)
        out = dict(inputs)
        embeds = out.pop("inputs_embeds", None)
        input_ids = out.pop("input_ids", None)
        if embeds is None:
            embeds = self.base_forward(input_ids)  # (B, T, H)
        prefix = table[slots, table.shape[1] - width :].to(embeds.dtype)  # (B, P, H)
        length = embeds.shape[1]
        out["inputs_embeds"] = torch.cat([prefix, embeds], dim=1)  # (B, P + T, H)
        mask = out.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        out["attention_mask"] = torch.cat([prefix_mask.to(mask), mask], dim=1)
        positions = out.get("position_ids")
        if positions is not None or bool(pad.any()):
            if positions is None:
                positions = torch.arange(length, device=device).expand(batch, length)
            virtual = (columns[None, :] - pad[:, None]).clamp(min=0)  # (B, P)
            real = positions.to(device) + count[:, None]  # (B, T)
            out["position_ids"] = torch.cat([virtual, real], dim=1)
        labels = out.get("labels")
        if labels is not None:
            ignored = torch.full((batch, width), IGNORE_INDEX, dtype=labels.dtype)
            out["labels"] = torch.cat([ignored.to(labels.device), labels], dim=1)
        return out

    def row_slots(self, row_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Each row's slot in `prompt_table` (the last slot: no virtual tokens)."""
        names = self.ordered()
        if row_ids is None:
            active = [n for n in self.active if n in self.specs]
            if not active:
                return None
            if len(active) > 1:
                raise ValueError(
                    f"several prompt-tuning adapters are active ({', '.join(active)}); their "
                    "virtual tokens do not combine: activate one, or route rows with "
                    "adapter_names"
                )
            return torch.full((batch,), names.index(active[0]), dtype=torch.long)
        if row_ids.dim() != 1:
            mine = torch.tensor(list(self.name_of), device=row_ids.device)
            if not bool(torch.isin(row_ids, mine).any()):
                return None  # no row uses a prompt: a packed batch of other adapters' rows
            raise ValueError(
                "prompt tuning prepends tokens per row: pass one adapter id per row, not per "
                "token (a packed batch cannot grow its rows)"
            )
        size = max(max(self.ids.values()), int(row_ids.max())) + 1
        lookup = torch.full((size + 1,), len(names), dtype=torch.long, device=row_ids.device)
        for slot, name in enumerate(names):
            lookup[self.ids[name]] = slot
        return lookup[torch.where(row_ids >= 0, row_ids, size)]

    def ordered(self) -> list[str]:
        """This layer's adapters in id order (the slot order of `prompt_table`)."""
        return sorted(self.specs, key=self.ids.__getitem__)

    def prompt_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A + 1, P_max, H) virtual tokens per slot, right-aligned, zeros for the last (base)
        slot, and (A + 1,) token counts. Built per call, so gradients reach the parameters."""
        params = [self.prompt_embeddings[name] for name in self.ordered()]
        longest = max(p.shape[0] for p in params)
        rows = [F.pad(p, (0, 0, longest - p.shape[0], 0)) for p in params]
        table = torch.stack([*rows, torch.zeros_like(rows[0])]).to(device)
        counts = torch.tensor([p.shape[0] for p in params] + [0], device=device)
        return table, counts


def _batch_of(inputs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("prompt tuning needs input_ids or inputs_embeds to prepend its tokens to")


def _cache_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 for none): then the prompt is in it already."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])


def _decode_step(
    inputs: dict[str, Any], prefix_mask: torch.Tensor, count: torch.Tensor
) -> dict[str, Any]:
    """A call after the prefill: the cache holds the virtual tokens, so only the attention
    mask grows by them and explicit positions move past them."""
    out = dict(inputs)
    mask = out.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = torch.cat([prefix_mask.to(mask), mask], dim=1)
    if out.get("position_ids") is not None:
        out["position_ids"] = out["position_ids"] + count[:, None].to(out["position_ids"])
    return out


def input_embedding_name(model: nn.Module) -> str:
    """The module path of the model's input embedding (`model.embed_tokens` for Llama)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, AdapterLayer):
        embedding = embedding.base_layer
    for name, module in model.named_modules():
        if module is embedding or (
            isinstance(module, AdapterLayer) and module.base_layer is embedding
        ):
            return name
    raise TargetModulesError(
        f"{type(model).__name__} has no get_input_embeddings(); prompt tuning prepends virtual "
        "tokens to the input embeddings, so it needs a model that exposes them"
    )


def select_targets(model: nn.Module, config: PromptTuningConfig) -> list[str]:
    """The input embedding, with the model-derived config fields filled in."""
    name = input_embedding_name(model)
    module = model.get_submodule(name)
    config.describe_model(model, module.base_layer if isinstance(module, AdapterLayer) else module)
    return [name]


def make_layer(module: nn.Module) -> PromptEmbedding:
    """Wrap the input embedding (any module with a (vocab, width) `weight`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"prompt tuning wraps an embedding, not {type(module).__name__}")
    return PromptEmbedding(module)


METHOD = Method(
    name="prompt_tuning",
    config_class=PromptTuningConfig,
    make_layer=make_layer,
    description="Prompt tuning: learned virtual tokens prepended to every sequence",
    select_targets=select_targets,
)
