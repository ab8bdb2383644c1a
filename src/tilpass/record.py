"""`tilpass record`: a change record for an adapter that was saved without one (e.g. by PEFT).

The adapter is first loaded onto the named base model (strictly: every tensor must fit, so an
adapter for another base is refused, naming the module and both shapes); then the adapter
file, each base weight file and each data file are hashed into `tilpass_record.json`, in the
same format a training run writes (`card.write_record`). What only the training run knew
(metrics, steps, the run's settings) stays empty, and the record says how it came about.
"""

from __future__ import annotations

from pathlib import Path

from tilpass.adapter_files import WEIGHTS_NAME
from tilpass.card import RECORD_NAME, ChangeRecord, hash_files, write_record
from tilpass.config import read_config_dict
from tilpass.errors import TilpassError
from tilpass.inspect_adapter import describe_adapter, load_onto_base

PROVENANCE = (
    "written by `tilpass record` for an adapter saved without a record; training settings, "
    "metrics and compute were not recorded"
)


def create_record(
    directory: Path,
    base: str,
    data: list[Path],
    task: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Check that the adapter in `directory` fits `base`, then write its record; returns its
    path. Nothing is written when a check fails."""
    from tilpass.pretrained import (
        DEFAULT_MODEL_ALIASES,
        base_weights_note,
        manifest_sha256,
        resolve_model_path,
        weights_file_hashes,
    )

    record_path = directory / RECORD_NAME
    if record_path.exists() and not overwrite:
        raise TilpassError(
            f"{record_path} already exists; check it with `tilpass verify {directory}`, or "
            "pass --overwrite to replace it"
        )
    for path in data:
        if not path.exists():
            raise TilpassError(f"--data {path}: no such file or directory")
    report = describe_adapter(directory)  # refuses a directory that is not an adapter
    adapted = load_onto_base(directory, base)
    total = sum(p.numel() for p in adapted.base_model.parameters())
    files = weights_file_hashes(resolve_model_path(base))
    change = ChangeRecord(
        base_model=DEFAULT_MODEL_ALIASES[1] if base in DEFAULT_MODEL_ALIASES else base,
        base_weights_note=base_weights_note(base),
        base_weights_sha256=manifest_sha256(files),
        base_weights_files=files,
        method=report.method,
        trainable_parameters=report.trainable_parameters,
        total_parameters=total,
        config=read_config_dict(directory),
        weights_files=[WEIGHTS_NAME],
        data_files=hash_files(list(data)),
        task=task,
        provenance=PROVENANCE,
    )
    return write_record(directory, change)
