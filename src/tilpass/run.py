"""tilpass's main job: model + dataset -> trained adapter, measured before and after, documented.

`RunConfig` is the whole of a `tilpass train` YAML file: the model, the method and its
settings, the data, the loop's hyper-parameters and the output directory. `run` executes it:

    load model -> tokenize data -> evaluate base -> add adapter -> train -> evaluate again
      -> save adapter (PEFT layout) + model card + tilpass_record.json (hashes) + config
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from tilpass.adapter_files import atomic_write_bytes
from tilpass.card import ChangeRecord, hash_files, write_card, write_record
from tilpass.data import build_dataset, collate, load_records
from tilpass.evaluate import evaluate_generation, evaluate_loss
from tilpass.methods.lora import LoraConfig
from tilpass.model import get_peft_model
from tilpass.pretrained import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ALIASES,
    load_model,
    resolve_model_path,
    weights_sha256,
)
from tilpass.train import (
    TrainConfig,
    TrainResult,
    consumed_examples,
    seed_everything,
    train,
)

METHODS = ("lora", "full")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataSection:
    """Where the examples come from and how they become tokens."""

    train: str = _opt("", "Training file (JSONL/JSON/CSV/Parquet) or load_from_disk directory.")
    eval: str = _opt("", "Held-out file for loss and exact-match evaluation (optional).")
    format: str | None = _opt(None, "chat | prompt_completion | alpaca | text (default: detect).")
    max_length: int = _opt(512, "Truncate examples to this many tokens (counted in the log).")
    train_on_prompt: bool = _opt(False, "Put loss on prompt tokens too (default: answers only).")
    skip_bad_rows: bool = _opt(False, "Skip and count malformed rows instead of stopping.")


@dataclass
class LoraSection:
    """LoRA settings (PEFT's field names)."""

    r: int = _opt(8, "Rank of the update.")
    lora_alpha: float = _opt(16, "Scale numerator: the update is scaled by alpha / r.")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA branch input.")
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Names, a regex, or 'all-linear'."},
    )
    use_rslora: bool = _opt(False, "Scale by alpha / sqrt(r).")
    use_dora: bool = _opt(False, "Weight-decomposed LoRA.")
    init_lora_weights: bool | str = field(
        default=True, metadata={"help": "True (Kaiming A, zero B) | gaussian."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Whole modules to train and save (e.g. [lm_head])."}
    )


@dataclass
class RunConfig:
    """One training run, as written in a `tilpass train` YAML file."""

    model: str = _opt(DEFAULT_MODEL, "Default model name or a local Hugging Face directory.")
    method: str = _opt("lora", "lora | full (full fine-tuning, the baseline).")
    output_dir: str = _opt("runs/tilpass", "Receives adapter/, checkpoints, metrics and plot.")
    task: str = _opt("", "One line saying what the adapter is for (goes in the model card).")
    eval_before: bool = _opt(True, "Evaluate the base model first, for the before/after table.")
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (saved with the run)."""
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    """What `run` measured and where it wrote it."""

    before: dict[str, float]
    after: dict[str, float]
    adapter_dir: Path
    train: TrainResult
    examples: list[dict[str, Any]]


def build_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """A `RunConfig` from nested dicts; unknown keys are errors that list the valid ones."""
    return _build(RunConfig, values, source)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields_by_name))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(sorted(fields_by_name))} (tilpass train --help lists them)"
        )
    kwargs = {}
    for name, value in values.items():
        default = fields_by_name[name].default_factory  # type: ignore[misc]
        nested = default() if callable(default) else None
        if dataclasses.is_dataclass(nested):
            kwargs[name] = _build(type(nested), value or {}, f"{where}: {name}")
        else:
            kwargs[name] = _coerce(value, str(fields_by_name[name].type), f"{where}: {name}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Numbers YAML reads as strings (`1e-3` is a string in YAML 1.1) become numbers."""
    kinds = {"float": float, "int": int}
    if annotation in kinds and isinstance(value, str):
        try:
            return kinds[annotation](value)
        except ValueError:
            raise ValueError(f"{where}: expected {annotation}, got {value!r}") from None
    if annotation == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def field_help(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field, nested sections flattened."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            rows += field_help(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


def evaluate_all(model: Any, tokenizer: Any, eval_ds: Any, records: list, cfg: RunConfig) -> dict:
    """Loss, perplexity and exact match on the held-out split."""
    t = cfg.training
    out: dict[str, Any] = {}
    pad = eval_ds.pad_token_id
    losses = evaluate_loss(model, eval_ds, partial(collate, pad_token_id=pad), t.eval_batch_size)
    out.update(loss=losses["loss"], perplexity=losses["perplexity"])
    if records:
        from tilpass.data import prompt_ids, reference_answer

        sample = records[: t.eval_generation_samples] if t.eval_generation_samples else records
        gen = evaluate_generation(
            model,
            tokenizer,
            sample,
            prompt_ids,
            reference_answer,
            t.eval_max_new_tokens,
            t.eval_batch_size,
        )
        out.update(exact_match=gen["exact_match"], examples=gen["examples"])
    return out


def run(config: RunConfig, resume: str | None = None, log: Any = print) -> RunResult:
    """Execute one run end to end; see the module docstring for the steps."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    if not config.data.train:
        raise ValueError("data.train is not set: give a training file (--data.train PATH)")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    model_dir = resolve_model_path(config.model)
    model, tokenizer = load_model(
        config.model, device="cuda" if torch.cuda.is_available() else None
    )
    d = config.data
    build = partial(
        build_dataset,
        tokenizer=tokenizer,
        max_length=d.max_length,
        train_on_prompt=d.train_on_prompt,
        skip_bad_rows=d.skip_bad_rows,
        format=d.format,
    )
    train_ds = build(d.train)
    log(f"train data: {train_ds.stats.summary()}")
    eval_ds = build(d.eval) if d.eval else None
    records = (
        load_records(d.eval, skip_bad_rows=d.skip_bad_rows, format=d.format)[0] if d.eval else []
    )
    if eval_ds is not None:
        log(f"eval data: {eval_ds.stats.summary()}")
    before: dict[str, Any] = {}
    if eval_ds is not None and config.eval_before:
        log("evaluating the base model ...")
        before = evaluate_all(model, tokenizer, eval_ds, records, config)
    # Cards and adapter configs name the default model by its hub id, as PEFT and vLLM expect.
    base_name = DEFAULT_MODEL_ALIASES[1] if config.model in DEFAULT_MODEL_ALIASES else config.model
    seed_everything(config.training.seed)  # the adapter's initial weights follow the seed
    if config.method == "lora":
        lora = LoraConfig(
            **dataclasses.asdict(config.lora),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_name,
        )
        model = get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    started = time.perf_counter()
    # The loop evaluates on the held-out split every `eval_steps` and at the end; that final
    # evaluation is the "after" column.
    result = train(
        model,
        train_ds,
        eval_ds,
        partial(collate, pad_token_id=train_ds.pad_token_id),
        config.training,
        out,
        tokenizer=tokenizer if records else None,
        eval_records=records or None,
        resume=resume,
    )
    wall = time.perf_counter() - started
    final = result.eval_metrics
    after: dict[str, Any] = {}
    if "eval_loss" in final:
        after = {"loss": final["eval_loss"], "perplexity": final["eval_perplexity"]}
    if "exact_match" in final:
        after |= {"exact_match": final["exact_match"], "examples": final.get("examples", [])}
    if eval_ds is not None and not after:  # resumed from a checkpoint of a finished run
        after = evaluate_all(model, tokenizer, eval_ds, records, config)
    adapter_dir = out / "adapter"
    if config.method == "lora":
        model.save_pretrained(adapter_dir)
        adapter_config = model.peft_config["default"].to_dict()
    else:
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        adapter_config = {"method": "full"}
    examples = after.pop("examples", [])
    before.pop("examples", None)
    lengths = train_ds.lengths
    consumed = consumed_examples(len(train_ds), result.global_step, config.training)
    change = ChangeRecord(
        base_model=base_name,
        base_weights_sha256=weights_sha256(model_dir),
        method="LoRA" if config.method == "lora" else "full fine-tuning",
        adapter_config=adapter_config,
        trainable_parameters=trainable,
        total_parameters=total,
        data_files=hash_files([p for p in (d.train, d.eval) if p]),
        metrics_before=before,
        metrics_after=after,
        steps=result.global_step,
        tokens=sum(lengths[i] for i in consumed),
        wall_time_s=wall,
        run_config=config.to_dict(),
        task=config.task or None,
    )
    write_record(
        adapter_dir,
        change,
        "adapter_model.safetensors" if config.method == "lora" else "model.safetensors",
    )
    write_card(adapter_dir, change)
    (out / "result.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    return RunResult(before, after, adapter_dir, result, examples)
