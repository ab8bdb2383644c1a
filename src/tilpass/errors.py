"""Exceptions a user can act on; each message names the file, key or module at fault."""

from __future__ import annotations


class TilpassError(Exception):
    """Base class for errors raised by tilpass about user input."""


PeftError = TilpassError
"""PEFT's name for the base of its errors; tilpass's errors are all `TilpassError`s."""


class AdapterFileError(TilpassError, ValueError):
    """An adapter directory or file is missing, corrupt, or does not fit the model."""


class ConfigKeysError(AdapterFileError, TypeError):
    """An `adapter_config.json` lacks a key every adapter config has (`peft_type`); also a
    `TypeError`, the type PEFT raises for it."""


class TargetModulesError(TilpassError, ValueError):
    """A `target_modules` entry matches nothing, or matches a module tilpass cannot adapt."""


class NoMatchingPeftModuleError(TargetModulesError):
    """An adapter's `target_modules` (or an entry of them) matched no module of the model
    (PEFT's name, so PEFT code that catches it ports unchanged)."""


class AdapterNameError(TilpassError, ValueError, KeyError):
    """An adapter name is unknown, or already taken (a `ValueError`, as PEFT raises, and a
    `KeyError` for code that catches a failed look-up)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class PeftWarning(UserWarning):
    """A warning about an adapter setting that works but may not do what was meant (PEFT's
    `PeftWarning`, under the same name so PEFT code that filters it keeps working)."""
