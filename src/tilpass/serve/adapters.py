"""The server's adapters: safe name resolution under `--adapter-dir` and an LRU cache.

Adapters named at start-up (`--adapter NAME=DIR`) or loaded through the API are pinned; those
a request names that are not in memory load from `--adapter-dir` on demand into an LRU cache
bounded by count and bytes. The model is changed only on the engine's worker thread (between
decode steps), and an adapter that a running sequence uses is never evicted.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilpass.errors import TilpassError
from tilpass.model_files import read_adapter_config

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(TilpassError):
    """An adapter request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name (letters, digits, `_`, `-`; at most 64)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def resolve_inside(root: Path, relative: str) -> Path:
    """The adapter directory `relative` under `root`, refused unless it stays inside `root`
    (no absolute path, no `..`, no symlink leading out) and holds a safetensors adapter."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise AdapterError(
            f"adapter path {relative!r} is refused: give a path relative to the adapter "
            "directory, without '..'",
            status=400,
        )
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise AdapterError(f"adapter path {relative!r} leads outside the adapter directory")
    if not target.is_dir():
        raise AdapterError(
            f"no adapter {relative!r} in the adapter directory", status=404, code="model_not_found"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        file = target / name
        if not file.is_file():
            extra = " (safetensors only; .bin pickle files are not loaded)" * (name == WEIGHTS_FILE)
            raise AdapterError(f"adapter {relative!r} has no {name}{extra}")
        if not file.resolve().is_relative_to(base):
            raise AdapterError(f"adapter {relative!r}: {name} links outside the adapter directory")
    return target


@dataclass
class Entry:
    """One loaded adapter."""

    name: str
    path: Path | None  # None: added to the model in memory, not from a directory
    nbytes: int
    pinned: bool  # named at start-up or loaded through the API: never evicted
    used: int = 0  # LRU clock value of the last use


class CacheFull(AdapterError):
    """No room for another adapter: every cached one is in use."""


class AdapterCache:
    """The loaded adapters of one model, with an LRU policy for the on-demand ones.

    `known` and `listing` may be called from any thread; `ensure`, `load` and `unload`
    change the model and run on the engine's worker thread only.
    """

    def __init__(
        self, model: Any, adapter_dir: Path | None, max_count: int, max_bytes: int
    ) -> None:
        self.model = model
        self.adapter_dir = adapter_dir
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()
        self.clock = itertools.count(1)
        self.evictions = 0

    def listing(self) -> list[Entry]:
        """The loaded adapters, in load order."""
        with self.lock:
            return list(self.entries.values())

    def known(self, name: str) -> bool:
        """Whether a request may name `name`: loaded, or loadable from the adapter directory
        (raises `AdapterError` for an unsafe or unknown name)."""
        check_name(name)
        with self.lock:
            if name in self.entries:
                return True
        if self.adapter_dir is None:
            raise AdapterError(
                f"no adapter or model named {name!r} is loaded (start the server with "
                "--adapter-dir to load adapters on demand)",
                status=404,
                code="model_not_found",
            )
        path = resolve_inside(self.adapter_dir, name)
        if size_of(path) > self.max_bytes:
            raise AdapterError(
                f"adapter {name!r} has {size_of(path)} bytes, over the cache's limit of "
                f"{self.max_bytes} (--max-adapter-bytes)"
            )
        return True

    def ensure(self, name: str, busy: set[str]) -> None:
        """Make `name` loaded (from the adapter directory if needed, evicting least recently
        used on-demand adapters that no running sequence uses) and mark it used."""
        entry = self.entries.get(name)
        if entry is None:
            self.known(name)
            assert self.adapter_dir is not None
            path = resolve_inside(self.adapter_dir, name)
            self.make_room(size_of(path), busy)
            entry = self.load(name, path, pinned=False)
        entry.used = next(self.clock)

    def make_room(self, nbytes: int, busy: set[str]) -> None:
        """Evict on-demand adapters (least recently used first) until one more fits."""
        while True:
            cached = [e for e in self.entries.values() if not e.pinned]
            size = sum(e.nbytes for e in cached)
            if len(cached) < self.max_count and size + nbytes <= self.max_bytes:
                return
            idle = sorted((e for e in cached if e.name not in busy), key=lambda e: e.used)
            if not idle:
                raise CacheFull(
                    f"the adapter cache is full ({len(cached)} adapters, {size} bytes) and "
                    "every cached adapter is in use; retry shortly",
                    status=503,
                    code="adapter_cache_full",
                )
            self.remove(idle[0].name)
            self.evictions += 1

    def load(self, name: str, path: Path, pinned: bool) -> Entry:
        """Load the adapter directory `path` under `name` (the model is left as it was if the
        load fails)."""
        with self.lock:
            if name in self.entries:
                raise AdapterError(
                    f"an adapter named {name!r} is already loaded; unload it first", status=400
                )
        try:
            refuse_base_changing(path)
            self.model.load_adapter(path, name)
        except (TilpassError, ValueError, OSError, KeyError, TypeError) as exc:
            message = f"adapter {name!r} could not be loaded from {path.name}: {exc}"
            raise AdapterError(message) from None
        entry = Entry(name, path, size_of(path), pinned, next(self.clock))
        with self.lock:
            self.entries[name] = entry
        return entry

    def adopt(self, name: str) -> Entry:
        """Register (pinned) an adapter the model already holds."""
        params = self.model.adapter_parameters(name)
        entry = Entry(name, None, sum(p.numel() * p.element_size() for p in params), True)
        with self.lock:
            self.entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Delete `name` from the model and the cache."""
        with self.lock:
            self.entries.pop(name)
        self.model.delete_adapter(name)

    def unload(self, name: str, busy: set[str]) -> None:
        """Unload an adapter on request; refused while a running sequence uses it."""
        if name not in self.entries:
            raise AdapterError(f"no adapter named {name!r} is loaded", 404, "model_not_found")
        if name in busy:
            raise AdapterError(
                f"adapter {name!r} is in use by running requests; retry when they finish", 409
            )
        self.remove(name)


def refuse_base_changing(path: Path) -> None:
    """Refuse an adapter whose loading rewrites base weights (PiSSA / OLoRA): every adapter of
    the server shares them, and unloading would not restore them. A config that cannot be
    read is left to the load, whose error names what is wrong with it."""
    try:
        config = read_adapter_config(path, is_trainable=False)
    except (TilpassError, ValueError, OSError, KeyError, TypeError):
        return
    if config.changes_base_weights:
        raise AdapterError(
            "it changes the base weights that every served adapter shares "
            f"(init_lora_weights={getattr(config, 'init_lora_weights', None)!r}); save it as a "
            "plain LoRA adapter with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<the adapter saved before training>)"
        )


def size_of(path: Path) -> int:
    """The bytes of an adapter directory's weights file."""
    return (path / WEIGHTS_FILE).stat().st_size
