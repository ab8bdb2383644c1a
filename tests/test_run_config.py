"""Run configs: method sections derived from the registry's config classes, checked early."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import tiny_llama
from tilpass import LoraConfig
from tilpass.card import ChangeRecord
from tilpass.cli import QUICKSTART, merge, parse_overrides
from tilpass.config_fields import coerce, opt
from tilpass.methods import METHODS
from tilpass.run import (
    RunConfig,
    RunConfigError,
    build_config,
    changed_settings,
    documented_attributes,
    help_sections,
    prepare_model,
    save_trained,
)


def test_a_method_section_gets_its_config_class_defaults() -> None:
    config = build_config({})
    assert config.method == "lora"
    assert config.adapter == LoraConfig()
    assert (config.adapter.lora_alpha, config.adapter.lora_dropout) == (8, 0.0)
    assert build_config({"lora": None}).adapter == LoraConfig()


def test_quickstart_keeps_its_explicit_lora_settings() -> None:
    config = build_config(merge(QUICKSTART, {}), "quickstart")
    assert config.adapter == LoraConfig(
        r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    assert type(config.adapter.lora_alpha) is float


def test_every_field_is_reachable_from_the_command_line() -> None:
    parsed = parse_overrides(
        [
            "--lora.target_modules",
            "[q_proj, v_proj]",
            "--lora.rank_pattern",
            "{q_proj: 6}",
            "--lora.alpha_pattern={v_proj: 3}",
            "--lora.exclude_modules",
            "[model.layers.1.self_attn.v_proj]",
            "--lora.layers_to_transform",
            "[0, 1]",
            "--lora.init_lora_weights",
            "gaussian",
        ]
    )
    config = build_config(parsed, "command line")
    assert config.adapter == LoraConfig(
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 6},
        alpha_pattern={"v_proj": 3.0},
        exclude_modules=["model.layers.1.self_attn.v_proj"],
        layers_to_transform=[0, 1],
        init_lora_weights="gaussian",
    )
    model = prepare_model(tiny_llama(), config)
    shapes = {k: tuple(v.shape) for k, v in model.adapter_state_dict("default").items()}
    prefix = "base_model.model.model.layers"
    assert shapes == {
        f"{prefix}.0.self_attn.q_proj.lora_A.weight": (6, 32),
        f"{prefix}.0.self_attn.q_proj.lora_B.weight": (32, 6),
        f"{prefix}.1.self_attn.q_proj.lora_A.weight": (6, 32),
        f"{prefix}.1.self_attn.q_proj.lora_B.weight": (32, 6),
        f"{prefix}.0.self_attn.v_proj.lora_A.weight": (8, 32),
        f"{prefix}.0.self_attn.v_proj.lora_B.weight": (16, 8),
    }
    assert model.peft_config["default"].task_type == "CAUSAL_LM"
    assert config.adapter.task_type is None  # the run's own config is left as given


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lora": {"r": 0}}, "run.yaml: lora: r must be a positive integer, got 0"),
        (
            {"lora": {"lora_dropout": 1.0}},
            "run.yaml: lora: lora_dropout must be in [0, 1), got 1.0",
        ),
        ({"lora": {"r": True}}, "run.yaml: lora: r: expected int, got True"),
        ({"lora": {"r": "four"}}, "run.yaml: lora: r: expected int, got 'four'"),
        ({"lora": {"lora_alpha": [1]}}, "run.yaml: lora: lora_alpha: expected float, got [1]"),
        (
            {"lora": {"rank_pattern": {"q_proj": "x"}}},
            "run.yaml: lora: rank_pattern: expected dict[str, int], got {'q_proj': 'x'}",
        ),
        ({"lora": 3}, "run.yaml: lora: expected a mapping of keys, got 3"),
        (
            {"lora": {"task_type": "CAUSAL_LM"}},
            "run.yaml: lora: unknown key(s) task_type; valid keys: alora_invocation_tokens, "
            "alpha_pattern, arrow_config, bias,",
        ),
        (
            {"method": "vera"},
            "run.yaml: method: unknown method 'vera'; choose one of "
            + ", ".join([*METHODS, "full"]),
        ),
        (
            {"method": "full", "lora": {"r": 4}},
            "run.yaml: section 'lora' is for method lora, but the run's method is full; remove "
            "the section or set method: lora",
        ),
        ({"full": {}}, "run.yaml: unknown key(s) full; valid keys: model, method, output_dir,"),
        (
            {"training": {"max_steps": "1.5"}},
            "run.yaml: training: max_steps: expected int (a whole",
        ),
        (
            {"training": {"lr_scheduler": "cosin"}},
            "run.yaml: training: lr_scheduler must be one of ('cosine', 'linear', 'constant'), "
            "got 'cosin'",
        ),
        ({"eval_before": "no"}, "run.yaml: eval_before: expected bool, got 'no'"),
    ],
)
def test_bad_settings_name_the_source_section_and_key(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_config(values, "run.yaml")


def test_full_fine_tuning_has_no_adapter_config() -> None:
    config = build_config({"method": "full", "training": {"max_steps": 3}})
    assert config.adapter is None
    assert list(config.to_dict()) == [
        "model",
        "method",
        "output_dir",
        "task",
        "eval_before",
        "quantize",
        "data",
        "training",
    ]
    with pytest.raises(RunConfigError, match="method 'full' trains no adapter"):
        RunConfig(method="full", adapter=LoraConfig())
    model = prepare_model(tiny_llama(), config)
    assert all(p.requires_grad for p in model.parameters())


def test_the_saved_config_reads_back_as_the_same_run() -> None:
    values = {
        "model": "some/dir",
        "task": "t",
        "lora": {"r": 6, "target_modules": "all-linear", "rank_pattern": {"q_proj": 4}},
        "data": {"train": "a.jsonl", "max_length": 64},
        "training": {"learning_rate": "1e-3", "max_steps": 5},
    }
    config = build_config(values)
    saved = config.to_dict()
    assert saved["lora"]["r"] == 6 and saved["lora"]["rank_pattern"] == {"q_proj": 4}
    assert "task_type" not in saved["lora"] and "peft_type" not in saved["lora"]
    again = build_config(yaml.safe_load(yaml.safe_dump(saved)), "config.yaml")
    assert again == config and again.to_dict() == saved


def test_changed_settings_are_those_that_differ_from_the_class_defaults() -> None:
    assert changed_settings(LoraConfig()) == {}
    assert changed_settings(LoraConfig(r=6, lora_alpha=8.0, rank_pattern={"k": 4})) == {
        "r": 6,
        "rank_pattern": {"k": 4},
    }


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("1e-3", "float", 0.001),
        ("8", "int", 8),
        ("1e3", "int", 1000),
        (16, "float", 16.0),
        ("5", "int | None", 5),
        (None, "list[str] | str | None", None),
        ("all-linear", "list[str] | str | None", "all-linear"),
        ("gaussian", "bool | str", "gaussian"),
        ({"a": 4}, "dict[str, int]", {"a": 4}),
        ({"a": 4}, "dict[str, float]", {"a": 4}),
        ([0, 1], "list[int] | int | None", [0, 1]),
        ("anything", "Path", "anything"),
    ],
)
def test_coerce_converts_what_yaml_reads(value: Any, annotation: str, expected: Any) -> None:
    result = coerce(value, annotation, "f.yaml: s: k")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation"),
    [("x", "float"), (True, "int"), (1.5, "int"), ([1, "a"], "list[int] | None"), (3, "str")],
)
def test_coerce_rejects_other_types_naming_the_key(value: Any, annotation: str) -> None:
    with pytest.raises(ValueError) as info:
        coerce(value, annotation, "f.yaml: s: k")
    assert str(info.value) == f"f.yaml: s: k: expected {annotation}, got {value!r}"


def test_opt_copies_mutable_defaults() -> None:
    @dataclasses.dataclass
    class Section:
        names: list[str] = opt(["a"], "Names.")
        size: int = opt(3, "Size.")

    first, second = Section(), Section()
    first.names.append("b")
    assert second.names == ["a"] and Section().size == 3
    assert [f.metadata["help"] for f in dataclasses.fields(Section)] == ["Names.", "Size."]


def test_help_falls_back_to_the_docstring_attributes() -> None:
    class Documented:
        """Something.

        Attributes:
            alpha: the first
                one, continued.
            beta / gamma: shared text.

        More prose after the block.
        """

    assert documented_attributes(Documented) == {
        "alpha": "the first one, continued.",
        "beta": "shared text.",
        "gamma": "shared text.",
    }
    blocks = dict(help_sections())
    lora_rows = {
        key: text
        for title, rows in blocks.items()
        if title.startswith("lora ")
        for key, _, text in rows
    }
    assert lora_rows["lora.r"] == "Rank of the update."  # the field's own help metadata
    assert lora_rows["lora.target_modules"].startswith("Module names")  # inherited fields too
    assert help_sections()[2][1][0] == ("training.learning_rate", 2e-4, "Peak AdamW learning rate.")


class FailingSave:
    """A model whose save writes part of a file, then fails."""

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")


def test_saving_replaces_the_directory_whole_or_not_at_all(tmp_path: Path) -> None:
    config = build_config({"lora": {"target_modules": ["q_proj"]}})
    model = prepare_model(tiny_llama(), config)
    stale = tmp_path / "adapter" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("from an earlier run")
    record = ChangeRecord("base", None, "lora", trainable_parameters=1, total_parameters=2)
    saved = save_trained(model, None, tmp_path, record)
    assert saved == tmp_path / "adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    names = sorted(p.name for p in saved.iterdir())
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tilpass_record.json",
    ]
    assert record.config["peft_type"] == "LORA" and record.config["target_modules"] == ["q_proj"]
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        save_trained(FailingSave(), None, tmp_path, record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
