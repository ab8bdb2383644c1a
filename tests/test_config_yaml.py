"""Run-config YAML: strict parsing, and naming where each setting came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tilpass.config_yaml import (
    ConfigFileError,
    ConfigSources,
    load_config_file,
    parse_value,
    read_overrides,
)


def test_values_and_the_line_of_every_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n\ntraining:\n  learning_rate: 1e-3\n  seed: 3\nlora: {r: 4}\n")
    values, lines = load_config_file(path)
    assert values == {
        "model": "m",
        "training": {"learning_rate": "1e-3", "seed": 3},
        "lora": {"r": 4},
    }
    assert lines == {
        ("model",): 1,
        ("training",): 3,
        ("training", "learning_rate"): 4,
        ("training", "seed"): 5,
        ("lora",): 6,
        ("lora", "r"): 6,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a: 1\nb:\n  c: 2\n  c: 3\n",
            "run.yaml, line 4, column 3: invalid YAML: key 'c' appears "
            "twice in one mapping (first on line 3)",
        ),
        ("a: [1\n", "run.yaml, line 2, column 1: invalid YAML: while parsing a flow sequence"),
        ("- 1\n- 2\n", "run.yaml: expected a YAML mapping of keys at the top level, got list"),
        ("a: b: c\n", "run.yaml, line 1, column 5: invalid YAML: mapping values are not allowed"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(path)
    assert str(caught.value).startswith(str(tmp_path / message)), str(caught.value)


def test_an_empty_file_is_an_empty_config_and_a_missing_one_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_config_file(tmp_path / "empty.yaml") == ({}, {})
    with pytest.raises(ConfigFileError, match="no such config file"):
        load_config_file(tmp_path / "missing.yaml")


def test_overrides_keep_the_path_of_each_flag() -> None:
    values, paths = read_overrides(
        [
            "--training.learning_rate",
            "1e-3",
            "--lora.target_modules=[q_proj]",
            "--eval-before",
            "no",
        ]
    )
    assert values == {
        "training": {"learning_rate": "1e-3"},
        "lora": {"target_modules": ["q_proj"]},
        "eval_before": False,
    }
    assert paths == {("training", "learning_rate"), ("lora", "target_modules"), ("eval_before",)}
    with pytest.raises(ConfigFileError, match=r"^command line --lora.r, line 1, column 3"):
        parse_value("[4", "--lora.r")


def test_origin_prefers_the_flag_then_the_line_then_the_file() -> None:
    sources = ConfigSources(
        file="run.yaml",
        lines={("lora",): 5, ("lora", "r"): 6},
        overrides={("lora", "target_modules")},
    )
    assert sources.origin("lora", "target_modules") == "command line (--lora.target_modules)"
    assert sources.origin("lora", "r") == "run.yaml, line 6"
    assert sources.origin("lora", "lora_alpha") == "run.yaml, line 5"  # default: the section
    assert sources.origin("training", "seed") == "run.yaml"
    assert ConfigSources().origin("training", "seed") == "command line"
    assert ConfigSources.of("quickstart").origin("lora") == "quickstart"


def build_from(tmp_path: Path, text: str, flags: list[str] | None = None) -> str:
    """The error `build_config` gives for a YAML file (and flags), as the CLI combines them."""
    from tilpass.cli import merge
    from tilpass.run_config import build_config

    path = tmp_path / "run.yaml"
    path.write_text(text)
    values, lines = load_config_file(path)
    overrides, paths = read_overrides(flags or [])
    sources = ConfigSources(file="run.yaml", lines=lines, overrides=paths)
    with pytest.raises(ValueError) as caught:
        build_config(merge(values, overrides), sources)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        (
            'lora:\n  init_lora_weights: "false"\n',
            [],
            "run.yaml, line 2: lora: init_lora_weights: expected bool | str, got 'false': a "
            "quoted string, not a boolean; write false without quotes",
        ),
        ('eval_before: "no"\n', [], "run.yaml, line 1: eval_before: expected bool, got 'no'"),
        (
            "training:\n  lr_scheduler: cosin\n",
            [],
            "run.yaml, line 2: training: lr_scheduler must be one of ('cosine', 'linear', "
            "'constant'), got 'cosin'",
        ),
        (
            "data:\n  max_length: 64\n",
            ["--data.max_length", "0"],
            "command line (--data.max_length): data: max_length must be >= 1, got 0",
        ),
        (
            "training:\n  max_steps: 2\n",
            ["--training.learning_rat", "1"],
            "command line (--training.learning_rat): training: unknown key(s) learning_rat",
        ),
        ("training:\n  seed: .nan\n", [], "run.yaml, line 2: training: seed: expected int"),
    ],
)
def test_config_errors_blame_the_line_or_the_flag(
    tmp_path: Path, text: str, flags: list[str], message: str
) -> None:
    assert build_from(tmp_path, text, flags).startswith(message)
