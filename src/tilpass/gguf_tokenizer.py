"""The `tokenizer.ggml.*` keys of a GGUF file for a byte-level BPE tokenizer (GPT-2 style, as
the default model's): tokens by id, their types, the merges, special ids and chat template."""

from __future__ import annotations

import json
from typing import Any

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
"""llama.cpp's token types."""


def tokenizer_model(tokenizer: Any) -> dict[str, Any]:
    """The `model` section of the fast tokenizer's JSON; refuses anything but BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        from tilpass.gguf_export import GgufExportError

        raise GgufExportError(
            "export-gguf writes byte-level BPE tokenizers (GPT-2 style, as the default model's) "
            f"only; this tokenizer's model is {model.get('type')!r}"
        )
    return model


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; ids past the tokenizer are padding (unused)."""
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    count = len(tokenizer)
    if count > vocab_size:
        from tilpass.gguf_export import GgufExportError

        raise GgufExportError(
            f"the tokenizer has {count} tokens but the model's vocabulary only {vocab_size}"
        )
    tokens, types = [], []
    for token in tokenizer.convert_ids_to_tokens(list(range(count))):
        tokens.append(token)
        types.append(NORMAL if token not in added else CONTROL if added[token] else USER_DEFINED)
    for i in range(count, vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    return tokens, types


def add_tokenizer(writer: Any, tokenizer: Any, config: Any, pre: str = "gpt2") -> None:
    """Write the tokenizer into `writer` (a `gguf.GGUFWriter`)."""
    merges = tokenizer_model(tokenizer).get("merges", [])
    tokens, types = token_list(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
