"""tilpass's main job: model + dataset -> trained adapter, measured before and after, documented.

`RunConfig` is the whole of a `tilpass train` YAML file: the model, the method and its
settings, the data, the loop's hyper-parameters and the output directory. Each registered
method (`tilpass.methods.METHODS`) has a section named after it (`lora:`) whose keys are the
fields of its config class, with that class's defaults. Only the run's method's section is
read, so a section for another method is an error rather than settings silently ignored;
`method: full` trains every parameter instead (the baseline) and has no section. `run`
executes a config:

    load model -> add adapter -> tokenize data -> evaluate base (adapter off) -> train
      -> evaluate again -> save adapter (PEFT layout) + model card + tilpass_record.json
      (hashes) + config

A full fine-tuning run saves the whole model (Hugging Face layout) in `model/` instead of
`adapter/`. Every file is written atomically; the saved directory appears by one rename.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import secrets
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from tilpass.adapter_files import WEIGHTS_NAME, atomic_write_bytes
from tilpass.card import ChangeRecord, hash_files, write_card, write_record
from tilpass.config import CONFIG_NAME, AdapterConfig
from tilpass.config_fields import coerce, opt
from tilpass.data import TokenizedDataset, build_dataset, collate, load_records
from tilpass.errors import TilpassError
from tilpass.evaluate import evaluate_model
from tilpass.methods import METHODS, method_named, method_of
from tilpass.model import AdaptedModel, get_peft_model
from tilpass.pretrained import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ALIASES,
    load_model,
    resolve_model_path,
    weights_sha256,
)
from tilpass.quantize import QUANT_TYPES, QuantizeConfig, logical_numel, quantize_model
from tilpass.train import (
    TrainConfig,
    TrainResult,
    consumed_examples,
    seed_everything,
    train,
)

FULL = "full"
"""The `method` that trains every parameter of the model: the baseline, not an adapter."""

FULL_METHOD_NAME = "full fine-tuning"
"""How records and cards name `method: full`."""

BOOKKEEPING = frozenset(f.name for f in dataclasses.fields(AdapterConfig))
"""Fields every adapter config has that the run fills in itself (not settable in YAML)."""

DEFAULT_METHOD = next(iter(METHODS))
"""The first registered method: what a run uses when its config names none."""

ADAPTER_DIR, MODEL_DIR = "adapter", "model"


class RunConfigError(TilpassError, ValueError):
    """A `tilpass train` config (file or command line) that cannot describe a run."""


@dataclass
class DataSection:
    """Where the examples come from and how they become tokens."""

    train: str = opt("", "Training file (JSONL/JSON/CSV/Parquet) or load_from_disk directory.")
    eval: str = opt("", "Held-out file for loss and exact-match evaluation (optional).")
    format: str | None = opt(None, "chat | prompt_completion | alpaca | text (default: detect).")
    max_length: int = opt(512, "Truncate examples to this many tokens (counted in the log).")
    train_on_prompt: bool = opt(False, "Put loss on prompt tokens too (default: answers only).")
    skip_bad_rows: bool = opt(False, "Skip and count malformed rows instead of stopping.")


@dataclass
class RunConfig:
    """One training run, as written in a `tilpass train` YAML file.

    `adapter` is the chosen method's config object, built from its section (`lora:`); it is
    None for `method: full`. Left out, it is the method's config with its own defaults.
    """

    model: str = opt(DEFAULT_MODEL, "Default model name or a local Hugging Face directory.")
    method: str = opt(
        DEFAULT_METHOD,
        f"{' | '.join(METHODS)} | {FULL} (every parameter trained: the baseline).",
    )
    output_dir: str = opt(
        "runs/tilpass", "Receives adapter/ (model/ for full), checkpoints, metrics and plot."
    )
    task: str = opt("", "One line saying what the run trains for (goes in the model card).")
    eval_before: bool = opt(True, "Evaluate the base model first, for the before/after table.")
    quantize: str | None = opt(
        None, "nf4 | fp4 | int8: load the base quantized (QLoRA with nf4; needs bitsandbytes)."
    )
    data: DataSection = field(default_factory=DataSection)
    training: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None:
            _check_quantize(self.quantize, self.method)
        if self.method == FULL:
            if self.adapter is not None:
                raise RunConfigError(f"method {FULL!r} trains no adapter, but one was given")
            return
        method = method_named(self.method)
        if self.adapter is None:
            self.adapter = method.config_class()
        elif method_of(self.adapter) is not method:
            raise RunConfigError(
                f"method {self.method!r} needs a {method.config_class.__name__}, "
                f"got a {type(self.adapter).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, in the YAML layout `build_config` reads."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALAR_KEYS}
        if self.adapter is not None:
            saved = self.adapter.to_dict()
            out[self.method] = {f.name: saved[f.name] for f in method_fields(type(self.adapter))}
        out["data"] = dataclasses.asdict(self.data)
        out["training"] = dataclasses.asdict(self.training)
        return out


_SECTIONS: dict[str, type] = {"data": DataSection, "training": TrainConfig}
_SCALAR_KEYS = ("model", "method", "output_dir", "task", "eval_before", "quantize")


def _check_quantize(quantize: str, method: str) -> None:
    """A quantized base needs an adapter to train, and a format bitsandbytes offers."""
    if quantize not in QUANT_TYPES:
        raise RunConfigError(
            f"quantize: unknown format {quantize!r}; choose one of {', '.join(QUANT_TYPES)}"
        )
    if method == FULL:
        raise RunConfigError(
            f"quantize: {quantize} cannot be combined with method: {FULL}: quantized weights are "
            "frozen and cannot be trained. Train an adapter over the quantized base (method: "
            "lora, i.e. QLoRA), or drop quantize for full fine-tuning."
        )


@dataclass
class RunResult:
    """What `run` measured and where it wrote it."""

    before: dict[str, float]
    after: dict[str, float]
    saved_dir: Path  # adapter/ for an adapter method, model/ for full fine-tuning
    train: TrainResult
    examples: list[dict[str, Any]]


def method_fields(config_class: type[AdapterConfig]) -> list[dataclasses.Field[Any]]:
    """The fields of a method's config a YAML section sets (the bookkeeping ones left out)."""
    return [f for f in dataclasses.fields(config_class) if f.name not in BOOKKEEPING]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default value (a fresh one for `default_factory` fields)."""
    return f.default_factory() if callable(f.default_factory) else f.default


def changed_settings(config: AdapterConfig) -> dict[str, Any]:
    """The settings of an adapter config that differ from its class's defaults."""
    saved = config.to_dict()
    return {
        f.name: saved[f.name]
        for f in method_fields(type(config))
        if saved[f.name] != json.loads(json.dumps(field_default(f)))
    }


def _annotation(f: dataclasses.Field[Any]) -> str:
    if isinstance(f.type, str):
        return f.type
    return f.type.__name__ if isinstance(f.type, type) else str(f.type)


def build_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """A `RunConfig` from nested dicts, with every setting checked before a model is loaded.

    Unknown keys, values of the wrong type and values the method's config rejects (`r: 0`)
    raise `RunConfigError` naming `source` (the file, or "command line"), the section and key.
    """
    if not isinstance(values, dict):
        raise RunConfigError(f"{source}: expected a mapping, got {type(values).__name__}")
    method = _chosen_method(values, source)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in _SECTIONS and f.name in values:
            kwargs[f.name] = _build_section(_SECTIONS[f.name], values[f.name], source, f.name)
        elif f.name in _SCALAR_KEYS and f.name in values:
            kwargs[f.name] = coerce(values[f.name], _annotation(f), f"{source}: {f.name}")
    kwargs["method"] = method
    if method != FULL:
        kwargs["adapter"] = _build_section(
            method_named(method).config_class, values.get(method), source, method
        )
    config = RunConfig(**kwargs)
    try:
        config.training.validate()
    except ValueError as exc:
        raise RunConfigError(f"{source}: training: {exc}") from exc
    return config


def _chosen_method(values: dict[str, Any], source: str) -> str:
    """The run's method; unknown top-level keys and other methods' sections are errors."""
    valid = [*_SCALAR_KEYS, *_SECTIONS, *METHODS]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise RunConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)} "
            "(tilpass train --help lists them)"
        )
    method = coerce(values.get("method", DEFAULT_METHOD), "str", f"{source}: method")
    choices = [*METHODS, FULL]
    if method not in choices:
        raise RunConfigError(
            f"{source}: method: unknown method {method!r}; choose one of {', '.join(choices)}"
        )
    others = [name for name in METHODS if name in values and name != method]
    if others:
        raise RunConfigError(
            f"{source}: section '{others[0]}' is for method {others[0]}, but the run's method "
            f"is {method}; remove the section or set method: {others[0]}"
        )
    return method


def _build_section(cls: type, values: Any, source: str, section: str) -> Any:
    """One section's dataclass from its mapping; the config class's own checks run here."""
    where = f"{source}: {section}"
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise RunConfigError(f"{where}: expected a mapping of keys, got {values!r}")
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.name not in BOOKKEEPING}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise RunConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(sorted(by_name))} (tilpass train --help lists them)"
        )
    kwargs = {
        name: coerce(value, _annotation(by_name[name]), f"{where}: {name}")
        for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise RunConfigError(f"{where}: {exc}") from exc


def documented_attributes(cls: type) -> dict[str, str]:
    """Field descriptions from a Google-style docstring's `Attributes:` block.

    `a / b: text` describes both fields; indented lines continue the description above them.
    """
    out: dict[str, str] = {}
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    names: list[str] = []
    for line in lines[starts[0] + 1 :] if starts else []:
        text = line.strip()
        head, colon, rest = text.partition(":")
        keys = [k.strip() for k in head.split("/")]
        if colon and all(k.isidentifier() for k in keys):
            names = keys
            out.update(dict.fromkeys(names, rest.strip()))
        elif text and names:
            out.update({n: f"{out[n]} {text}" for n in names})
        elif not text:
            break
    return out


def help_sections() -> list[tuple[str, list[tuple[str, Any, str]]]]:
    """`tilpass train --help`'s blocks: (title, [(dotted key, default, help)]) per section.

    A field's help is its `help` metadata, else its line in the class's `Attributes:` block.
    """

    def rows(cls: type, fields: list[dataclasses.Field[Any]], prefix: str) -> list[Any]:
        documented = documented_attributes(cls)
        return [
            (
                prefix + f.name,
                field_default(f),
                f.metadata.get("help") or documented.get(f.name, ""),
            )
            for f in fields
        ]

    top = [f for f in dataclasses.fields(RunConfig) if f.name in _SCALAR_KEYS]
    blocks = [("run (top level)", rows(RunConfig, top, ""))]
    for name, cls in _SECTIONS.items():
        blocks.append((name, rows(cls, list(dataclasses.fields(cls)), f"{name}.")))
    for method in METHODS.values():
        config_class = method.config_class
        title = f"{method.name} (used when method: {method.name}): {method.description}"
        blocks.append((title, rows(config_class, method_fields(config_class), f"{method.name}.")))
    return blocks


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


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
    records = load_records(section.eval, skip_bad_rows=section.skip_bad_rows, format=section.format)
    return RunData(train_ds, eval_ds, records[0])


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
    return get_peft_model(model, adapter)


def _as_base(model: Any) -> AbstractContextManager[Any]:
    """Within the block the model computes as the base model (adapters switched off)."""
    return model.disable_adapter() if isinstance(model, AdaptedModel) else nullcontext()


def run(config: RunConfig, resume: str | None = None, log: Any = print) -> RunResult:
    """Execute one run end to end; see the module docstring for the steps."""
    if not config.data.train:
        raise RunConfigError("data.train is not set: give a training file (--data.train PATH)")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    model, tokenizer = load_model(
        config.model, device="cuda" if torch.cuda.is_available() else None
    )
    quantized = None
    if config.quantize is not None:
        quantized = quantize_model(model, QuantizeConfig(config.quantize)).to_dict()
        log(quantized["summary"])
    seed_everything(config.training.seed)  # the adapter's initial weights follow the seed
    # The adapter goes in before the data and the base evaluation, so that an adapter that
    # does not fit the model (target_modules matching nothing) stops the run at once.
    model = prepare_model(model, config)
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
    )
    wall = time.perf_counter() - started
    after = _after_metrics(result, model, tokenizer, data, config)
    examples = after.pop("examples", [])
    before.pop("examples", None)
    change = _change_record(config, data, result, (trainable, total), (before, after), wall)
    change.base_quantization = quantized
    saved = save_trained(model, tokenizer, out, change)
    body = json.dumps({"before": before, "after": after}, indent=2) + "\n"
    atomic_write_bytes(out / "result.json", body.encode())
    return RunResult(before, after, saved, result, examples)


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
) -> ChangeRecord:
    """What the card and the record say about this run: (trainable, total) parameter counts,
    (before, after) metrics."""
    consumed = consumed_examples(len(data.train), result.global_step, config.training)
    return ChangeRecord(
        base_model=base_model_name(config.model),
        base_weights_sha256=weights_sha256(resolve_model_path(config.model)),
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


def save_trained(model: Any, tokenizer: Any, out: Path, change: ChangeRecord) -> Path:
    """Save the adapter (or the full model), its record and card; the directory appears whole.

    Everything is written into a hidden directory beside the destination, which then replaces
    `out/adapter` (`out/model` for full fine-tuning) by a rename, so a crash never leaves a
    half-written directory under that name. `change` gets the saved config and weight files.
    """
    final = out / (MODEL_DIR if change.full_model else ADAPTER_DIR)
    staging = out / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        model.save_pretrained(staging)
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
