"""The loading, combining, writing and self-check behind `tilpass merge` with several adapters
(`merge_combine.py` checks the inputs first and imports this only then, since it needs torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tilpass.card import RECORD_NAME, ChangeRecord, render_card, write_record
from tilpass.merge_combine import PEFT_KIND, PROMPTS, CombineRequest, LogitCheck, write_json
from tilpass.merging import add_weighted
from tilpass.model import AdaptedModel
from tilpass.pretrained import base_weights_note, known_weights_sha256, load_model

COMBINED = "default"
"""The combined adapter's name (PEFT saves `default` at the top of the directory)."""


class CombineRun:
    """One combination: the base with the parents loaded, then the combined adapter."""

    def __init__(self, request: CombineRequest) -> None:
        self.request = request
        dtype = torch.float32 if request.dtype == "fp32" else torch.bfloat16
        self.dtype = dtype
        model, self.tokenizer = load_model(request.base, dtype=dtype)
        names = [f"parent{i}" for i in range(len(request.parents))]
        self.model = AdaptedModel.from_pretrained(model, request.parents[0].path, names[0])
        for name, parent in zip(names[1:], request.parents[1:], strict=True):
            self.model.load_adapter(parent.path, name)
        add_weighted(
            self.model,
            names,
            [p.weight for p in request.parents],
            COMBINED,
            PEFT_KIND[request.combination],
            {},
            density=request.density,
        )
        for name in names:
            self.model.delete_adapter(name)
        self.model.set_adapter(COMBINED)

    def logits(self, model: Any) -> list[torch.Tensor]:
        """Logits of the check prompts, one tensor (1, T, vocab) each, as float32."""
        out = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
                out.append(model(ids).logits.float())
        return out

    def write(self, staging: Path) -> LogitCheck:
        """Write the result into `staging`; return the logit difference it causes."""
        reference = self.logits(self.model)
        if self.request.output == "adapter":
            self.model.save_pretrained(staging, selected_adapters=[COMBINED])
            self.model.load_adapter(staging, "reloaded")
            self.model.set_adapter("reloaded")
            written = self.logits(self.model)
            trainable = sum(p.numel() for p in self.model.adapter_parameters(COMBINED))
        else:
            merged = self.model.merge_and_unload()
            merged.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            trainable = sum(p.numel() for p in merged.parameters())
            del merged
            written = self.logits(reload_model(staging, self.dtype))
        check = LogitCheck.compare(written, reference)
        self.describe(staging, trainable, check)
        return check

    def describe(self, staging: Path, trainable: int, check: LogitCheck) -> None:
        """The card and the record, naming the parents, their weights and the self-check."""
        request = self.request
        full = request.output == "model"
        weights_files = sorted(p.name for p in staging.glob("*.safetensors"))
        config_file = staging / ("config.json" if full else "adapter_config.json")
        total = sum(p.numel() for p in self.model.base_model.parameters())
        change = ChangeRecord(
            base_model=request.base,
            base_weights_sha256=known_weights_sha256(request.base),
            base_weights_note=base_weights_note(request.base),
            method="lora",
            trainable_parameters=trainable,
            total_parameters=total,
            full_model=full,
            config=json.loads(config_file.read_text()),
            settings={"combination": request.combination, **self.parents_setting()},
            weights_files=weights_files,
            task=f"{request.combination} combination of {len(request.parents)} adapters",
        )
        record_path = write_record(staging, change)
        record = json.loads(record_path.read_text())
        record["merge"] = self.merge_entry(check)
        write_json(staging / RECORD_NAME, record)
        card = render_card(change, request.out) + "\n" + "\n".join(self.card_section(check))
        (staging / "README.md").write_text(card + "\n")

    def parents_setting(self) -> dict[str, Any]:
        """The card's settings lines: the parents with their weights, and the density."""
        out: dict[str, Any] = {
            "parents": [f"{p.path} (weight {p.weight:g})" for p in self.request.parents]
        }
        if self.request.density is not None:
            out["density"] = self.request.density
        return out

    def merge_entry(self, check: LogitCheck) -> dict[str, Any]:
        """The record's `merge` section."""
        request = self.request
        return {
            "combination": request.combination,
            "add_weighted_adapter_combination_type": PEFT_KIND[request.combination],
            "density": request.density,
            "output": request.output,
            "dtype": request.dtype,
            "parents": [
                {
                    "path": str(p.path),
                    "weight": p.weight,
                    "adapter_sha256": p.sha256,
                    "base_model": p.config.get("base_model_name_or_path"),
                }
                for p in request.parents
            ],
            "self_check": {
                "max_logit_difference": check.absolute,
                "relative_to_largest_logit": check.relative,
                "tolerance_relative": request.limit,
                "passed": check.relative <= request.limit,
            },
        }

    def card_section(self, check: LogitCheck) -> list[str]:
        """The card's `Merged from` section."""
        request = self.request
        rows = [f"| `{p.path}` | {p.weight:g} | `{p.sha256[:16]}…` |" for p in self.request.parents]
        return [
            "## Merged from",
            "",
            f"Combination `{request.combination}`"
            + (f" (density {request.density:g})" if request.density is not None else "")
            + " of these adapters:",
            "",
            "| adapter | weight | adapter file SHA-256 |",
            "|---|---|---|",
            *rows,
            "",
            f"Self-check: the largest logit difference between base + combined adapter and "
            f"this result on {len(PROMPTS)} prompts is {check.describe()} "
            f"(tolerance {request.limit:g} of the largest logit for {request.dtype}).",
        ]


def reload_model(directory: Path, dtype: torch.dtype) -> Any:
    """The written full model, read back from disk as a user would load it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
