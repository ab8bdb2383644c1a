"""Calls whose inputs adapter layers extend (prompt tuning's virtual tokens).

A layer with `EXTENDS_INPUTS` rewrites a call's keyword inputs before the base forward
(`extend_inputs`): it may turn token ids into embeddings with its tokens in front and extend
the attention mask, positions and labels. `generate` then runs from those embeddings, and the
result is given back as a plain call's would be: the input ids followed by the new tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tilpass.layers import AdapterLayer
from tilpass.routing import Routing


def extend_inputs(
    layers: list[AdapterLayer],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    routing: Routing | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's inputs after the layers that extend them had their say."""
    if not layers:
        return args, kwargs
    if args:  # a positional input_ids becomes a keyword the layers can replace
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    for layer in layers:
        kwargs = layer.extend_inputs(kwargs, None if routing is None else routing.ids)
    return args, kwargs


def generate_extended(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call_args: tuple[Any, ...],
    call_kwargs: dict[str, Any],
) -> Any:
    """`model.generate` on extended inputs (`call_*`), returned as for the original ones."""
    if "inputs_embeds" not in call_kwargs or "inputs_embeds" in kwargs:
        return model.generate(*call_args, **call_kwargs)
    # The tokens became embeddings: generate from them, with positions taken from the
    # extended mask, and put the prompt's ids in front of the new tokens.
    call_kwargs = {k: v for k, v in call_kwargs.items() if k != "position_ids"}
    out = model.generate(*call_args, **call_kwargs)
    input_ids = args[0] if args else kwargs["input_ids"]
    if isinstance(out, torch.Tensor):
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
    out.sequences = torch.cat([input_ids, out.sequences.to(input_ids.device)], dim=1)
    return out  # return_dict_in_generate=True: scores etc. are for the new tokens
