"""Process and device settings for training: freed-memory reuse, autocast, peak memory,
activation checkpointing.

The process-wide settings that make CPU training faster are applied by the `tilpass` command
only.

The library's `train()` never changes them: a notebook or service that trains in-process keeps
its own malloc behaviour. The CLI calls :func:`apply_process_settings` before a run.

Every training step allocates and frees the same large buffers (activations, logits,
gradients). glibc's malloc unmaps freed blocks above a threshold (at most 32 MB by default)
and trims the heap's free top, so each step page-faults those buffers in again. Keeping freed
memory for reuse removes that cost (full fine-tuning's step went from 2.4-3.1 s to 2.1-2.2 s
on 2 cores between the recorded runs of `benchmarks/train_step.py`, docs/benchmarks.md); the
process's resident size then stays at its peak instead of dropping between steps.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from tilpass.losses import unwrap_base

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_LIMIT = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap

_applied = False


class ProcessSettings(Protocol):
    """The part of a training config that decides process settings (``TrainConfig``)."""

    keep_freed_memory: bool


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 1 GiB for reuse instead of returning them.

    Process-wide and idempotent. Returns whether the setting is in effect (False on systems
    without glibc, where nothing is changed).
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(M_MMAP_THRESHOLD, KEEP_LIMIT) == 1
    _applied = mmap_ok and mallopt(M_TRIM_THRESHOLD, 2 * KEEP_LIMIT - 1) == 1
    return _applied


def apply_process_settings(
    config: ProcessSettings, device: str | torch.device | None = None
) -> bool:
    """Apply the process settings a training config asks for; for the CLI, before a run.

    Today that is :func:`keep_freed_memory`, when ``config.keep_freed_memory`` is set and the
    run trains on the CPU (a GPU's memory is not glibc's).

    Args:
        config: The run's training config (``TrainConfig``).
        device: Where the model trains; None means CUDA when available, else CPU (as
            ``tilpass.run`` chooses).

    Returns:
        Whether freed memory is now kept for reuse.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not config.keep_freed_memory or torch.device(device).type != "cpu":
        return False
    return keep_freed_memory()


def autocast_for(config: Any, device: torch.device) -> AbstractContextManager[Any] | None:
    """bf16 autocast when asked for, or on ``auto`` with a bf16-capable GPU; else None (fp32)."""
    use_bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant activation checkpointing in the transformers model under ``model``.

    Non-reentrant, because the reentrant kind cuts the graph when no input requires grad
    (frozen embeddings), so adapters inside checkpointed layers would silently not train.
    """
    base = unwrap_base(model)
    kwargs = {"use_reentrant": False}
    if callable(getattr(base, "activation_checkpointing_enable", None)):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(base, "gradient_checkpointing_enable", None)):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"gradient_checkpointing=True but {type(base).__name__} has no "
            "gradient_checkpointing_enable(); use a transformers model or set it to False."
        )
