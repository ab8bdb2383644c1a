"""tilpass's main job: model + dataset -> trained adapter, measured before and after, documented.

`run` executes a `RunConfig` (`tilpass.run_config`: the whole of a `tilpass train` YAML file):

    check the config (paths, target modules on the meta device) -> claim the output directory
      -> load model -> add adapter -> tokenize data -> evaluate base (adapter off) -> train
      -> evaluate again -> save adapter (PEFT layout) + model card + tilpass_record.json
      (hashes) + config

A full fine-tuning run saves the whole model (Hugging Face layout) in `model/` instead of
`adapter/`. Every file is written atomically; the saved directory appears by one rename. An
output directory holding another run is refused unless the caller overwrites or resumes it
(`tilpass.run_dir`), and an adapter with a NaN or an infinity is never saved.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tilpass.adapter_files import WEIGHTS_NAME, atomic_write_bytes
from tilpass.card import ChangeRecord, hash_files, write_card, write_record
from tilpass.config import CONFIG_NAME
from tilpass.config_yaml import ConfigSources
from tilpass.data import TokenizedDataset, build_dataset, collate, load_records
from tilpass.data.packing import Batching, BatchPlan
from tilpass.data.sources import peek_format
from tilpass.distributed import DataParallel
from tilpass.evaluate import evaluate_model
from tilpass.json_files import dumps_strict
from tilpass.model import AdaptedModel
from tilpass.pretrained import (
    DEFAULT_MODEL_ALIASES,
    base_weights_note,
    load_model,
    manifest_sha256,
    resolve_model_path,
    weights_file_hashes,
)
from tilpass.quantize import QuantizeConfig, logical_numel, quantize_model
from tilpass.run_checks import check_run
from tilpass.run_config import (
    BOOKKEEPING,
    DEFAULT_METHOD,
    FULL,
    FULL_METHOD_NAME,
    DataSection,
    RunConfig,
    RunConfigError,
    build_config,
    changed_settings,
    documented_attributes,
    field_default,
    help_sections,
    method_fields,
    save_config,
)
from tilpass.run_dir import claim_output_dir
from tilpass.run_report import card_lines, figure_files, method_reports
from tilpass.train import (
    DivergenceError,
    TrainResult,
    seed_everything,
    train,
)
from tilpass.train_state import nonfinite_parameters

__all__ = [
    "BOOKKEEPING",
    "DEFAULT_METHOD",
    "FULL",
    "FULL_METHOD_NAME",
    "DataSection",
    "RunConfig",
    "RunConfigError",
    "RunData",
    "RunResult",
    "build_config",
    "changed_settings",
    "documented_attributes",
    "field_default",
    "held_out_metrics",
    "help_sections",
    "load_data",
    "method_fields",
    "run",
    "save_config",
    "save_trained",
]

ADAPTER_DIR, MODEL_DIR = "adapter", "model"


@dataclass
class RunResult:
    """What `run` measured and where it wrote it."""

    before: dict[str, float]
    after: dict[str, float]
    saved_dir: Path  # adapter/ for an adapter method, model/ for full fine-tuning
    train: TrainResult
    examples: list[dict[str, Any]]


@dataclass
class RunData:
    """The run's tokenized splits and the held-out records exact match is scored on."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    records: list[dict[str, Any]]


def load_data(section: DataSection, tokenizer: Any, log: Any = print) -> RunData:
    """Tokenize the training (and held-out) data as the `data:` section says."""
    build = partial(
        build_dataset,
        tokenizer=tokenizer,
        max_length=section.max_length,
        train_on_prompt=section.train_on_prompt,
        skip_bad_rows=section.skip_bad_rows,
        format=section.format,
    )
    train_ds = build(section.train)
    log(f"train data: {train_ds.stats.summary()}")
    if not section.eval:
        return RunData(train_ds, None, [])
    eval_ds = build(section.eval)
    log(f"eval data: {eval_ds.stats.summary()}")
    return RunData(train_ds, eval_ds, scored_records(section.eval, section))


def scored_records(path: str, section: DataSection, log: Any = print) -> list[dict[str, Any]]:
    """The held-out records exact match is scored on: none for plain text, which has no
    answers (its loss and perplexity are still measured)."""
    if (section.format or peek_format(path)) == "text":
        log(f"{path}: text records have no answers: loss and perplexity only, no exact match")
        return []
    return load_records(path, skip_bad_rows=section.skip_bad_rows, format=section.format)[0]


def held_out_metrics(
    model: Any, tokenizer: Any, eval_ds: Any, records: list, cfg: RunConfig
) -> dict[str, Any]:
    """Loss, perplexity and exact match on the held-out split: the trainer's own measurement
    (`evaluate_model`) with the run's settings, for the base-model column and `tilpass eval`."""
    t = cfg.training
    metrics = evaluate_model(
        model,
        eval_ds,
        partial(collate, pad_token_id=eval_ds.pad_token_id),
        tokenizer=tokenizer,
        records=records,
        batch_size=t.eval_batch_size,
        max_new_tokens=t.eval_max_new_tokens,
        generation_samples=t.eval_generation_samples,
    )
    return {
        k: metrics[k] for k in ("loss", "perplexity", "exact_match", "examples") if k in metrics
    }


def base_model_name(model: str) -> str:
    """The name cards and adapter configs give the base: the hub id for the default model."""
    return DEFAULT_MODEL_ALIASES[1] if model in DEFAULT_MODEL_ALIASES else model


def prepare_model(model: Any, config: RunConfig) -> Any:
    """Add the method's adapter (base frozen), or make every parameter trainable for `full`."""
    if config.adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    adapter = copy.deepcopy(config.adapter)
    adapter.task_type = "CAUSAL_LM"
    adapter.base_model_name_or_path = base_model_name(config.model)
    return AdaptedModel(model, adapter)  # keeps that name (get_peft_model takes the model's)


def _as_base(model: Any) -> AbstractContextManager[Any]:
    """Within the block the model computes as the base model (adapters switched off)."""
    return model.disable_adapter() if isinstance(model, AdaptedModel) else nullcontext()


def run(
    config: RunConfig,
    resume: str | None = None,
    log: Any = print,
    *,
    overwrite: bool = False,
    sources: ConfigSources | None = None,
    callbacks: Sequence[Any] = (),
    distributed: DataParallel | None = None,
    banner: Sequence[str] = (),
) -> RunResult:
    """Execute one run end to end; see the module docstring for the steps.

    Args:
        resume: ``"auto"`` or a checkpoint path: continue the run in ``output_dir``.
        overwrite: delete a run found in ``output_dir`` first (else such a directory is
            refused, unless resuming).
        sources: where the config's settings came from, for error messages.
        callbacks: training hooks passed to the loop (`tilpass.train_hooks.TrainingHook`).
        distributed: this process's ranks (`tilpass.distributed`); None: one process. Only
            rank 0 logs and writes files.
        banner: lines the caller wants logged once the settings are checked (the CLI's
            thread choice), before anything is loaded.
    """
    dp = distributed or DataParallel()
    log = log if dp.is_main else _quiet
    if not config.data.train:
        raise RunConfigError("data.train is not set: give a training file (--data.train PATH)")
    check_run(config, sources or ConfigSources.of("config"))
    for line in banner:
        log(line)
    out = Path(config.output_dir)
    run_id = _claim(config, out, dp, overwrite=overwrite, resume=resume)
    model, tokenizer, quantized = _build_model(config, dp, log)
    data = load_data(config.data, tokenizer, log)
    before = _base_metrics(model, tokenizer, data, config, log)
    trainable = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    log(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    if quantized is not None:
        log(model.base_storage().describe())
    log(dp.banner(config.training))
    batching = batching_of(config.data)
    log(batching.describe())
    started = time.perf_counter()
    # The loop evaluates on the held-out split every `eval_steps` and at the end; that final
    # evaluation is the "after" column.
    result = train(
        model,
        data.train,
        data.eval,
        partial(collate, pad_token_id=data.train.pad_token_id),
        config.training,
        out,
        tokenizer=tokenizer if data.records else None,
        eval_records=data.records or None,
        resume=resume,
        run_id=run_id,
        log=log,
        callbacks=callbacks,
        distributed=dp,
        batching=batching,
    )
    wall = time.perf_counter() - started
    dp.gather_parameters(model)  # FSDP2 shards made whole again, for saving
    after = _after_metrics(result, model, tokenizer, data, config)
    examples = after.pop("examples", [])
    before.pop("examples", None)
    change = _change_record(
        config, data, result, (trainable, total), (before, after), wall, dp.global_config
    )
    change.base_quantization = quantized
    reports = method_reports(model)
    for line in [line for made in reports for line in ["", made.title, *made.lines]]:
        log(line)
    change.method_report = card_lines(reports)
    _refuse_nonfinite(model, out)
    if not dp.is_main:  # rank 0 saves; the other ranks hold the same adapter
        kept = out / (MODEL_DIR if config.adapter is None else ADAPTER_DIR)
        return RunResult(before, after, kept, result, examples)
    saved = save_trained(model, tokenizer, out, change, figure_files(reports))
    body = dumps_strict({"before": before, "after": after}, indent=2) + "\n"
    atomic_write_bytes(out / "result.json", body.encode())
    return RunResult(before, after, saved, result, examples)


def _claim(
    config: RunConfig, out: Path, dp: DataParallel, *, overwrite: bool, resume: str | None
) -> str | None:
    """Rank 0 claims the output directory and writes the settings; every rank learns the
    run's id."""
    run_id = claim_output_dir(out, overwrite=overwrite, resume=resume) if dp.is_main else None
    run_id = dp.share(run_id)
    if dp.is_main:
        save_config(config, out / "config.yaml")
    return run_id


def _build_model(
    config: RunConfig, dp: DataParallel, log: Any
) -> tuple[Any, Any, dict[str, Any] | None]:
    """The base model (quantized if asked) with the run's fresh adapter, its tokenizer, and
    the quantization summary (None without). The adapter goes in before the data and the base
    evaluation, so that an adapter that does not fit the model stops the run at once."""
    model, tokenizer = load_model(config.model, device=dp.world.device())
    quantized = None
    if config.quantize is not None:
        quantized = quantize_model(model, QuantizeConfig(config.quantize)).to_dict()
        log(quantized["summary"])
    seed_everything(config.training.seed)  # the adapter's initial weights follow the seed
    return prepare_model(model, config), tokenizer, quantized


def _quiet(*_: Any) -> None:
    """The log of ranks other than 0."""


def batching_of(section: DataSection) -> Batching:
    """The batching mode the `data:` section asks for."""
    return Batching(section.packing, section.group_by_length, section.max_length)


def _base_metrics(
    model: Any, tokenizer: Any, data: RunData, config: RunConfig, log: Any
) -> dict[str, Any]:
    """The base model's held-out metrics (the adapter switched off), if asked for."""
    if data.eval is None or not config.eval_before:
        return {}
    log("evaluating the base model ...")
    with _as_base(model):
        return held_out_metrics(model, tokenizer, data.eval, data.records, config)


def _change_record(
    config: RunConfig,
    data: RunData,
    result: TrainResult,
    counts: tuple[int, int],
    metrics: tuple[dict[str, Any], dict[str, Any]],
    wall: float,
    global_config: Any = None,
) -> ChangeRecord:
    """What the card and the record say about this run: (trainable, total) parameter counts,
    (before, after) metrics; `global_config` turns the per-rank batch into the global one."""
    t = global_config(config.training) if global_config else config.training
    order = BatchPlan(data.train, collate, t.batch_size, t.seed, batching_of(config.data))
    consumed = order.consumed(result.global_step, t.gradient_accumulation_steps)
    base_files = weights_file_hashes(resolve_model_path(config.model))
    return ChangeRecord(
        base_model=base_model_name(config.model),
        base_weights_sha256=manifest_sha256(base_files),
        base_weights_files=base_files,
        base_weights_note=base_weights_note(config.model),
        method=config.method if config.adapter is not None else FULL_METHOD_NAME,
        full_model=config.adapter is None,
        settings=changed_settings(config.adapter) if config.adapter is not None else {},
        trainable_parameters=counts[0],
        total_parameters=counts[1],
        data_files=hash_files([p for p in (config.data.train, config.data.eval) if p]),
        metrics_before=metrics[0],
        metrics_after=metrics[1],
        steps=result.global_step,
        tokens=sum(data.train.lengths[i] for i in consumed),
        wall_time_s=wall,
        run_config=config.to_dict(),
        task=config.task or None,
    )


def _after_metrics(
    result: TrainResult, model: Any, tokenizer: Any, data: RunData, config: RunConfig
) -> dict[str, Any]:
    """The trained model's held-out metrics: the loop's final evaluation, or a new one."""
    final = result.eval_metrics
    after: dict[str, Any] = {}
    if "eval_loss" in final:
        after = {"loss": final["eval_loss"], "perplexity": final["eval_perplexity"]}
    if "exact_match" in final:
        after |= {"exact_match": final["exact_match"], "examples": final.get("examples", [])}
    if data.eval is not None and not after:  # resumed from a checkpoint of a finished run
        after = held_out_metrics(model, tokenizer, data.eval, data.records, config)
    return after


def _refuse_nonfinite(model: torch.nn.Module, out: Path) -> None:
    """Raise `DivergenceError` if a trained tensor holds NaN or infinity: never save those."""
    bad = nonfinite_parameters([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if bad:
        raise DivergenceError(
            f"{len(bad)} trained tensors hold NaN or infinity (e.g. {bad[0]}); nothing is saved "
            f"in {out}. Lower training.learning_rate and train again"
        )


def save_trained(
    model: Any,
    tokenizer: Any,
    out: Path,
    change: ChangeRecord,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save the adapter (or the full model), its record and card; the directory appears whole.

    Everything is written into a hidden directory beside the destination, which then replaces
    `out/adapter` (`out/model` for full fine-tuning) by a rename, so a crash never leaves a
    half-written directory under that name. `change` gets the saved config and weight files;
    `extra_files` ({name: bytes}, e.g. a method report's figure) are written beside them.
    """
    final = out / (MODEL_DIR if change.full_model else ADAPTER_DIR)
    staging = out / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(staging / name, data)
        if change.full_model:
            tokenizer.save_pretrained(staging)
            change.config = json.loads((staging / "config.json").read_text())
            change.weights_files = sorted(p.name for p in staging.glob("*.safetensors"))
        else:
            change.config = json.loads((staging / CONFIG_NAME).read_text())
            change.weights_files = [WEIGHTS_NAME]
        write_record(staging, change)
        write_card(staging, change, location=final)
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Put directory `new` at `final` by renames; an existing `final` is removed afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old)
