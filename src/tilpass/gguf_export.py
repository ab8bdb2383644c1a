"""`tilpass export-gguf`: a (merged) Llama-architecture model as one GGUF file.

GGUF is the format the default model ships in and the one llama.cpp, Ollama and
`transformers` (`from_pretrained(dir, gguf_file=...)`) read. The file reproduces the layout of
the default model's GGUF: `general.architecture = llama`, the `llama.*` hyper-parameters,
the byte-level BPE tokenizer as `tokenizer.ggml.*` (tokens, token types, merges, special ids,
chat template), and tensors named `token_embd`, `blk.N.attn_q|attn_k|attn_v|attn_output`,
`blk.N.ffn_gate|ffn_up|ffn_down`, `blk.N.attn_norm|ffn_norm`, `output_norm` (and `output`
when the embeddings are not tied).

llama.cpp's rotary embedding pairs neighbouring dimensions where Hugging Face pairs the two
halves of each head, so the q and k projections are stored with each head's rows reordered
(rows [0, h/2) and [h/2, h) interleaved); readers undo it. Norm weights stay float32; the
matrices are float16 (`f16`) or 8-bit blocks of 32 with one float16 scale (`q8_0`; a matrix
whose rows are not a multiple of 32 long stays float16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TYPES = ("f16", "q8_0")
TOLERANCE = {"f16": 1e-2, "q8_0": 5e-2}
"""The largest logit difference from the merged model each type may cause, relative to the
largest logit magnitude (measured differences are below; see docs/export.md)."""
FILE_TYPE = {"f16": 1, "q8_0": 7}
"""`general.file_type`: llama.cpp's MOSTLY_F16 and MOSTLY_Q8_0."""
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


class GgufExportError(ValueError):
    """A model this writer cannot express faithfully in llama.cpp's Llama layout."""


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q or k projection (heads * h, in) from Hugging Face's rotary layout (each
    head's first and second halves paired) to llama.cpp's (neighbouring rows paired)."""
    rows, cols = weight.shape
    half = rows // heads // 2
    per_head = weight.reshape(heads, 2, half, cols)  # (heads, halves, h/2, in)
    return per_head.transpose(1, 2).reshape(rows, cols)  # (heads, h/2, halves, in)


def check_llama(config: Any) -> None:
    """Refuse what the Llama layout written here does not express."""
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type is {getattr(config, 'model_type', None)!r}, not 'llama'")
    if getattr(config, "rope_scaling", None) not in (None, {}):
        kind = config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))
        if kind not in (None, "default"):
            problems.append(f"rope_scaling {config.rope_scaling}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    head_dim = getattr(config, "head_dim", None)
    if head_dim not in (None, config.hidden_size // config.num_attention_heads):
        problems.append(f"head_dim {head_dim} != hidden_size / heads")
    if problems:
        raise GgufExportError(
            "export-gguf writes Llama-architecture models only; this one has " + "; ".join(problems)
        )


@dataclass
class GgufTensors:
    """Named float32 tensors in GGUF names, in the order llama.cpp's converter writes them."""

    items: list[tuple[str, np.ndarray]]


def gguf_tensors(model: Any) -> GgufTensors:
    """The model's weights under llama.cpp's names (q and k rows reordered for its rotary)."""
    config = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    items = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf, ours in LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                weight = interleave_rope_rows(weight, config.num_attention_heads)
            elif ours == "attn_k":
                weight = interleave_rope_rows(weight, config.num_key_value_heads)
            items.append((f"blk.{i}.{ours}.weight", weight))
    items.append(("output_norm.weight", state["model.norm.weight"]))
    if not config.tie_word_embeddings:
        items.append(("output.weight", state["lm_head.weight"]))
    return GgufTensors([(name, t.contiguous().numpy()) for name, t in items])


def add_hyperparameters(writer: Any, config: Any, name: str, kind: str) -> None:
    """The `general.*` and `llama.*` keys the default model's GGUF has."""
    writer.add_name(name)
    writer.add_type("model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(FILE_TYPE[kind])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)


def rope_theta(config: Any) -> float:
    """The rotary base, where newer configs keep it (`rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def add_tensors(writer: Any, tensors: GgufTensors, kind: str) -> None:
    """Norms as float32; matrices as float16 or Q8_0 (rows not a multiple of 32: float16)."""
    import gguf

    for name, array in tensors.items:
        if array.ndim == 1:
            writer.add_tensor(name, array.astype(np.float32))
        elif kind == "q8_0" and array.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            blocks = gguf.quants.quantize(array.astype(np.float32), q8)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=q8)
        else:
            writer.add_tensor(name, array.astype(np.float16))


def write_gguf(
    model: Any, tokenizer: Any, path: Path, kind: str, name: str, pre: str = "gpt2"
) -> None:
    """Write `model` (a plain Llama, float weights) and its tokenizer as GGUF at `path`;
    `pre` names llama.cpp's pre-tokenizer (`smollm` for the default model)."""
    import gguf

    from tilpass.gguf_tokenizer import add_tokenizer

    if kind not in TYPES:
        raise GgufExportError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    check_llama(model.config)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    try:
        add_hyperparameters(writer, model.config, name, kind)
        add_tokenizer(writer, tokenizer, model.config, pre)
        add_tensors(writer, gguf_tensors(model), kind)
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def reload_logits(path: Path, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of `prompts` from the GGUF file, read back by `transformers` as float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return [model(ids).logits.float() for ids in prompts]
