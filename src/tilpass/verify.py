"""`tilpass verify`: recompute the hashes a `tilpass_record.json` holds, item by item.

Checked: the adapter file (or a full model's weight files) always, the saved config against
the record's copy, the base model's weights when `--base` names them (each file when the
record lists them, and the manifest hash `pretrained.weights_sha256`), and each data file
given with `--data` against the record's entry of the same path (else the same file name).
A record that is missing or unreadable is an error that says what to do; a directory saved by
PEFT has none, and `tilpass record` writes one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilpass.adapter_files import file_sha256
from tilpass.card import RECORD_NAME, hash_files
from tilpass.config import CONFIG_NAME
from tilpass.errors import TilpassError

RECORD_FORMAT = "tilpass-change-record/1"
OK, MISMATCH, MISSING, SKIPPED = "ok", "MISMATCH", "MISSING", "not checked"


class RecordError(TilpassError, ValueError):
    """A change record that is missing, not valid JSON, or lacks what a record holds."""


@dataclass
class Check:
    """One item of a verification: what was checked, its status and the evidence."""

    item: str
    status: str
    detail: str = ""


@dataclass
class Verification:
    """Every check of one directory; `ok` when each checked item matches."""

    directory: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (items not checked do not count)."""
        return all(c.status in (OK, SKIPPED) for c in self.checks)

    def lines(self) -> list[str]:
        """One line per item, then a summary."""
        out = [f"verifying {self.directory} against its {RECORD_NAME}"]
        out += [
            f"  {c.status:<12} {c.item}{f': {c.detail}' if c.detail else ''}" for c in self.checks
        ]
        checked = [c for c in self.checks if c.status != SKIPPED]
        bad = [c for c in checked if c.status != OK]
        if bad:
            out.append(f"{len(bad)} of {len(checked)} items checked do NOT match the record")
        else:
            out.append(f"all {len(checked)} items checked match the record")
        return out


def read_record(directory: Path) -> dict[str, Any]:
    """The directory's record, checked for the keys a verification reads."""
    path = directory / RECORD_NAME
    if not directory.is_dir():
        raise RecordError(f"{directory}: no such directory")
    if not path.is_file():
        raise RecordError(
            f"{path}: missing. An adapter saved by PEFT (or by hand) has no record; create one "
            f"with: tilpass record {directory} --base MODEL [--data FILE ...]"
        )
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(
            f"{path}: not valid JSON ({exc}); the record is corrupt. Restore it from a copy, "
            f"or write a new one with: tilpass record {directory} --base MODEL --overwrite"
        ) from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"{path}: expected 'format': {RECORD_FORMAT!r}, found {found!r}")
    for key in ("base_model", "data"):
        if key not in record:
            raise RecordError(f"{path}: no {key!r} key; the record is incomplete or corrupt")
    if "adapter" not in record and "model" not in record:
        raise RecordError(f"{path}: neither 'adapter' nor 'model' key; the record is corrupt")
    return record


def _hash_check(item: str, path: Path, recorded: str | None) -> Check:
    if not path.is_file():
        return Check(item, MISSING, f"{path} does not exist")
    actual = file_sha256(path)
    if actual == recorded:
        return Check(item, OK, f"sha256 {actual[:16]}…")
    return Check(item, MISMATCH, f"recorded {str(recorded)[:16]}…, found {actual[:16]}…")


def weight_checks(directory: Path, record: dict[str, Any]) -> list[Check]:
    """The saved weights (and, for an adapter, its config) against the record."""
    if "adapter" in record:
        saved = record["adapter"]
        checks = [_hash_check(saved["file"], directory / saved["file"], saved.get("sha256"))]
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            checks.append(Check(CONFIG_NAME, MISSING, f"{config_path} does not exist"))
        else:
            try:
                on_disk = json.loads(config_path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                on_disk = None
            differs = _differing_keys(saved.get("config", {}), on_disk)
            status = OK if not differs else MISMATCH
            detail = "same as the record's copy" if not differs else f"differs in {differs}"
            checks.append(Check(CONFIG_NAME, status, detail))
        return checks
    return [
        _hash_check(entry["file"], directory / entry["file"], entry.get("sha256"))
        for entry in record["model"]["files"]
    ]


def _differing_keys(recorded: dict[str, Any], on_disk: Any) -> str:
    if not isinstance(on_disk, dict):
        return "everything (the file is not a JSON object)"
    keys = sorted(k for k in set(recorded) | set(on_disk) if recorded.get(k) != on_disk.get(k))
    return ", ".join(keys)


def base_checks(record: dict[str, Any], base: str | None) -> list[Check]:
    """The base model's weights against the record (only when `base` names a model)."""
    recorded = record["base_model"]
    name = recorded.get("name_or_path")
    if base is None:
        return [Check(f"base model {name}", SKIPPED, "pass --base MODEL to check its weights")]
    from tilpass.pretrained import resolve_model_path, weights_sha256

    model_dir = resolve_model_path(base)
    checks = [
        _hash_check(f"base weights {entry['file']}", model_dir / entry["file"], entry["sha256"])
        for entry in recorded.get("files", [])
    ]
    actual = weights_sha256(model_dir)
    item = f"base model {base} (all *.safetensors files, manifest hash)"
    if actual == recorded.get("sha256"):
        checks.append(Check(item, OK, f"sha256 {actual[:16]}…"))
    else:
        expected = str(recorded.get("sha256"))[:16]
        checks.append(Check(item, MISMATCH, f"recorded {expected}…, found {actual[:16]}…"))
    return checks


def data_checks(record: dict[str, Any], data: list[Path]) -> list[Check]:
    """Each given data file against the record's entry of the same path or file name."""
    entries = {str(e["path"]): e["sha256"] for e in record["data"]}
    if not data:
        return [Check(f"data {path}", SKIPPED, "pass --data FILE to check it") for path in entries]
    checks = []
    for given in data:
        if not given.exists():
            checks.append(Check(f"data {given}", MISSING, "no such file or directory"))
            continue
        for path, actual in hash_files([given]).items():
            recorded = _recorded_entry(entries, Path(path))
            if recorded is None:
                checks.append(Check(f"data {path}", MISMATCH, "not among the record's data"))
            elif recorded == actual:
                checks.append(Check(f"data {path}", OK, f"sha256 {actual[:16]}…"))
            else:
                detail = f"recorded {recorded[:16]}…, found {actual[:16]}…"
                checks.append(Check(f"data {path}", MISMATCH, detail))
    return checks


def _recorded_entry(entries: dict[str, str], path: Path) -> str | None:
    for recorded, digest in entries.items():
        if recorded == str(path) or Path(recorded).resolve() == path.resolve():
            return digest
    same_name = [d for r, d in entries.items() if Path(r).name == path.name]
    return same_name[0] if len(same_name) == 1 else None


def verify(
    directory: Path, base: str | None = None, data: list[Path] | None = None
) -> Verification:
    """Check everything the record of `directory` pins down that is at hand."""
    record = read_record(directory)
    result = Verification(directory)
    try:
        result.checks += weight_checks(directory, record)
        result.checks += base_checks(record, base)
        result.checks += data_checks(record, list(data or []))
    except (KeyError, TypeError, AttributeError) as exc:
        raise RecordError(
            f"{directory / RECORD_NAME}: an entry lacks a field ({exc}); the record is corrupt"
        ) from exc
    return result
