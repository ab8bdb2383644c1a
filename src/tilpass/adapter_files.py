"""Adapter files: safetensors only, written atomically, validated on load, hashed.

An adapter directory is PEFT's: `adapter_config.json` + `adapter_model.safetensors`. PEFT's
pickle file (`adapter_model.bin`) is refused unless the caller opts in with `allow_pickle=True`,
and even then it is read only with `torch.load(weights_only=True)` and must hold tensors.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tilpass.errors import AdapterFileError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain `open` gives a new file under the current umask (0644 under 022)."""
    return 0o666 & ~_umask()


def _readable_temp(path: Path) -> tuple[int, str]:
    """A temporary file beside `path`, with the mode a plain `open` would give it (mkstemp's
    0600 would make every saved file private regardless of the user's umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, default_file_mode())
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _readable_temp(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Save a safetensors file atomically (contiguous CPU copies; shared storage is split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = _readable_temp(path)
    os.close(fd)
    try:
        save_file(plain, tmp, metadata=metadata)
        os.chmod(tmp, default_file_mode())  # safetensors writes the file anew, mode 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(directory: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the adapter weights of `directory`, with errors that name the file.

    `adapter_model.safetensors` first. Without it, PEFT's `adapter_model.bin` (written by
    `save_pretrained(safe_serialization=False)`) is read only through torch's weights-only
    loader, which accepts tensors and plain containers and runs no code from the file; a file
    holding anything else is refused. Pickle files are refused by default (`allow_pickle=False`):
    reading one is the caller's explicit choice.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(
                f"{path}: cannot be read as safetensors ({exc}); the file is truncated or "
                "corrupt: save the adapter again or copy it anew"
            ) from exc
    pickled = directory / PICKLE_NAME
    if pickled.is_file():
        return _load_pickle(pickled, allow_pickle)
    raise AdapterFileError(
        f"{directory}: no {WEIGHTS_NAME} found; an adapter directory holds adapter_config.json "
        f"and {WEIGHTS_NAME}"
    )


def _load_pickle(pickled: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """PEFT's pickle file, through `torch.load(weights_only=True)` only (see `load_tensors`)."""
    if not allow_pickle:
        raise AdapterFileError(
            f"{pickled}: pickle files are not loaded by default, since unpickling can run "
            f"code. Convert it to {WEIGHTS_NAME} (load it once with allow_pickle=True and "
            "save_pretrained again), or pass allow_pickle=True if you trust its source (it is "
            "then read with torch.load(weights_only=True): tensors only)."
        )
    try:
        data = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFileError(
            f"{pickled}: cannot be read with torch's weights-only loader ({exc}); tilpass never "
            f"unpickles other objects. Re-save the adapter as {WEIGHTS_NAME}."
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterFileError(f"{pickled}: expected a dict of tensors keyed by name")
    return data


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (adapter files and base weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
