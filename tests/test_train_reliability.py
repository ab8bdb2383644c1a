"""Training never hands back the wrong adapter: each safety net, through `tilpass` subprocesses.

Output directories that hold another run, configuration checked before any model is loaded,
divergence, strict YAML, `tilpass eval`'s options, evaluation formats, what resume says, and
the messages and files a run leaves. Runs use the tiny random model of `test_cli` and one or
two optimizer steps; checks that fail early must do so in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import common, save_tiny_model, sha256, tilpass, write_data
from tilpass.train_config import lr_factor


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of the CLI tests, saved as a local Hugging Face directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def unloadable_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights file replaced by garbage: a run that loads the model
    fails with a load error, so a config error reported instead proves nothing was loaded."""
    copy = tmp_path_factory.mktemp("unloadable-model")
    for item in tiny_model_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    for weights in copy.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return copy


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The CLI tests' chat training and held-out files."""
    return write_data(tmp_path_factory.mktemp("data"))


def short(model: Path, train: Path, test: Path, out: Path, steps: int = 2) -> list[str]:
    """A run of `steps` steps that checkpoints every step and keeps every checkpoint."""
    return [
        *common(model, train, test, out, steps=steps),
        "--training.save_steps",
        "1",
        "--training.save_total_limit",
        "0",
        "--training.logging_steps",
        "1",
        "--eval_before",
        "false",
    ]


def strict_json(text: str) -> Any:
    """Parse `text` as strict JSON (NaN / Infinity are errors)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256(p) for p in directory.rglob("*") if p.is_file()}


def run_id(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def checkpoint_owner(checkpoint: Path) -> str:
    return json.loads((checkpoint / "trainer_state.json").read_text())["run_id"]


# ------------------------------------------------------------------ 1. reused output_dir


def test_a_reused_output_dir_is_refused_replaced_or_resumed_never_mixed(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    train, test = data
    out = tmp_path / "out"
    tilpass("train", *short(tiny_model_dir, train, test, out), cwd=tmp_path)
    first = run_id(out)
    kept = snapshot(out)

    again = tilpass("train", *short(tiny_model_dir, train, test, out), cwd=tmp_path, check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"output_dir {out} holds another run: run {first} (finished, adapter/ saved)" in (
        again.stderr
    )
    assert "checkpoint-1/, checkpoint-2/" in again.stderr and "--overwrite" in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    failed = tilpass("train", *short(tiny_model_dir, bad, test, out), cwd=tmp_path, check=False)
    assert failed.returncode == 2 and "holds another run" in failed.stderr
    assert snapshot(out) == kept  # neither attempt touched the finished run (config.yaml too)

    old_checkpoint = tmp_path / "old-checkpoint"
    shutil.copytree(out / "checkpoint-2", old_checkpoint)
    tilpass("train", *short(tiny_model_dir, train, test, out, steps=1), "--overwrite", cwd=tmp_path)
    second = run_id(out)
    assert second != first
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert checkpoint_owner(out / "checkpoint-1") == second

    # Another run's checkpoint, put beside this run's, is neither resumed nor rotated out.
    shutil.copytree(old_checkpoint, out / "checkpoint-9")
    resumed = tilpass(
        "train",
        *short(tiny_model_dir, train, test, out, steps=3),
        "--training.save_total_limit",
        "1",
        "--resume",
        "auto",
        cwd=tmp_path,
    )
    assert f"resumed from {out / 'checkpoint-1'} (step 1 of 3)" in resumed.stdout
    assert "checkpoint-9 in" in resumed.stdout and "belong to another run" in resumed.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-9"]
    assert checkpoint_owner(out / "checkpoint-9") == first
    # (resuming another run's checkpoint by path is refused before loading: test_run_dir)


# ------------------------------------------------------- 2. config errors before any load


def yaml_case(model: Path, train: Path, out: Path, extra: str) -> str:
    return (
        f"model: {model}\noutput_dir: {out}\ndata:\n  train: {train}\n"
        f"lora:\n  target_modules: [q_proj, v_proj]\n{extra}"
    )


@pytest.mark.parametrize(
    ("yaml_extra", "flags", "expected"),
    [
        ("  r: 0\n", [], "run.yaml, line 7: lora: r must be a positive integer, got 0"),
        (
            "",
            ["--training.learning_rate", "-1"],
            "command line (--training.learning_rate): training: learning_rate must be a "
            "finite number > 0, got -1.0",
        ),
        (
            "",
            ["--lora.target_modules", "[q_porj]"],
            "command line (--lora.target_modules): lora: target_modules: Target modules "
            "['q_porj'] not found in the base model: target_modules entry 'q_porj' matches no "
            "module of LlamaForCausalLM",
        ),
    ],
)
def test_config_errors_stop_the_run_before_any_model_or_data_load(
    tmp_path: Path,
    unloadable_model_dir: Path,
    data: tuple[Path, Path],
    yaml_extra: str,
    flags: list[str],
    expected: str,
) -> None:
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml_case(unloadable_model_dir, data[0], out, yaml_extra))
    proc = tilpass("train", "run.yaml", *flags, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"tilpass train: error: {expected}"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # nothing loaded or logged
    assert not out.exists()  # and nothing written


# ------------------------------------------------------------------------ 3. divergence


def test_divergence_stops_the_run_and_saves_no_adapter(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    train, test = data
    out = tmp_path / "out"
    args = [*short(tiny_model_dir, train, test, out, steps=4), "--training.learning_rate", "1e30"]
    proc = tilpass("train", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "training diverged" in proc.stderr and "training.on_nonfinite: skip" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("tilpass train: error: step ")
    assert not (out / "adapter").exists()
    events = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite"
    assert None in (events[-1]["loss"], events[-1]["grad_norm"])  # NaN written as null

    # Skipping such steps instead (training.on_nonfinite: skip): test_train_resume.


# ------------------------------------------------------------------------------- 4. YAML


@pytest.mark.parametrize(
    ("text", "flags", "expected"),
    [
        ("lora:\n  r: [4\n", [], "run.yaml, line 3, column 1: invalid YAML"),
        (
            "training:\n  max_steps: 2\n",
            ["--training.learning_rat", "1"],
            "command line (--training.learning_rat): training: unknown key(s) learning_rat",
        ),
    ],
)
def test_yaml_errors_name_the_file_and_line_or_the_flag(
    tmp_path: Path, text: str, flags: list[str], expected: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    proc = tilpass("train", "run.yaml", *flags, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"tilpass train: error: {expected}"), proc.stderr


# ------------------------------------------------------------------------ 5. tilpass eval


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data: Any) -> Path:
    """The output directory of one short training run."""
    where = tmp_path_factory.mktemp("trained")
    out = where / "out"
    tilpass("train", *short(tiny_model_dir, *data, out), cwd=where)
    return out


def test_eval_honours_max_new_tokens_and_skip_bad_rows(
    tmp_path: Path, tiny_model_dir: Path, trained: Path
) -> None:
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    }
    file = tmp_path / "rows.jsonl"
    file.write_text(json.dumps(record) + "\n{broken\n")
    args = ["--model", str(tiny_model_dir), "--adapter", str(trained / "adapter"), "--data"]
    proc = tilpass("eval", *args, str(file), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--skip-bad-rows" in proc.stderr
    proc = tilpass(
        "eval", *args, str(file), "--skip-bad-rows", "--max-new-tokens", "2", cwd=tmp_path
    )
    assert "1 bad rows skipped" in proc.stdout and "exact_match" in proc.stdout
    assert "exact match: greedy decoding, up to 2 new tokens per answer" in proc.stdout


# ------------------------------------------------------------ 6. formats of the eval file


def test_text_eval_files_give_loss_only_and_unknown_formats_fail_early(
    tmp_path: Path, tiny_model_dir: Path, unloadable_model_dir: Path, data: tuple[Path, Path]
) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"note {i}: headache"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    args = [*short(tiny_model_dir, data[0], text, out), "--training.save_steps", "0"]
    proc = tilpass("train", *args, cwd=tmp_path)
    assert "text records have no answers: loss and perplexity only" in proc.stdout
    result = strict_json((out / "result.json").read_text())
    assert set(result["after"]) == {"loss", "perplexity"}
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events if e["step"] == 2 and e["event"] in ("checkpoint", "eval")]
    assert kinds == ["checkpoint", "eval"]  # saved before the final evaluation can fail

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "label": "a"}) + "\n")
    proc = tilpass(  # an unloadable model: the data error must come before any model load
        "train",
        *short(unloadable_model_dir, data[0], odd, tmp_path / "o2"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert f"data: eval: cannot tell the format of the first record of {odd}" in proc.stderr
    assert "--data.format" in proc.stderr and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- 7. resume


def test_resume_says_where_from_falls_back_and_applies_changed_settings(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    import os

    train, test = data
    out = tmp_path / "out"
    old_mask = os.umask(0o022)
    try:
        first = tilpass(
            "train", *short(tiny_model_dir, train, test, out), "--resume", "auto", cwd=tmp_path
        )
        damaged = out / "checkpoint-2" / "optimizer.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:100])  # cut by hand
        proc = tilpass(
            "train",
            *short(tiny_model_dir, train, test, out, steps=4),
            "--training.learning_rate",
            "0.02",
            "--resume",
            "auto",
            cwd=tmp_path,
        )
    finally:
        os.umask(old_mask)
    assert f"no complete checkpoint of this run in {out}; training from step 0" in first.stdout
    assert f"warning: {damaged} cannot be read" in proc.stdout
    assert "falling back to the checkpoint before it" in proc.stdout
    assert f"resumed from {out / 'checkpoint-1'} (step 1 of 4)" in proc.stdout
    assert "applied from step 2 on: learning_rate 0.01 -> 0.02, max_steps 2 -> 4" in proc.stdout
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert [lrs[s] for s in (2, 3, 4)] == [0.02 * lr_factor(s, 4, 0, "cosine") for s in (1, 2, 3)]
    # Every file the runs wrote has the mode a plain open() gives under umask 022.
    for path in out.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


# ------------------------------------------------------- 8. hints, checkpoints, files, base


def test_the_all_masked_message_shows_the_truncated_text_and_real_flags(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    train, test = data
    args = common(tiny_model_dir, train, test, tmp_path / "out")
    proc = tilpass("train", *args, "--data.max_length", "3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "raise data.max_length, --data.max_length on the command line" in proc.stderr
    shown = proc.stderr.split("cut here by max_length)):\n", 1)[1]
    assert "patient" not in shown and "cardiology" not in shown  # the truncated text only
    # The data messages' columns, empty answers and format hints: test_data (in process).


def test_an_adapter_on_another_base_model_warns(
    tmp_path: Path, tiny_model_dir: Path, trained: Path
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    torch.manual_seed(123)  # same shapes, other weights
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    adapter = trained / "adapter"
    proc = tilpass("generate", "--model", str(other), "--adapter", str(adapter), "hi", cwd=tmp_path)
    assert f"warning: {adapter} was trained on base model {tiny_model_dir}" in proc.stderr
    assert "has other weights" in proc.stderr
    same = tilpass(
        "generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "hi", cwd=tmp_path
    )
    assert "warning" not in same.stderr


def test_the_card_says_the_default_weights_come_from_a_q4_1_gguf() -> None:
    from tilpass.card import ChangeRecord, render_card
    from tilpass.pretrained import base_weights_note

    note = base_weights_note("SmolLM2-135M-Instruct")
    assert note is not None and "de-quantized" in note and "Q4_1" in note
    assert base_weights_note("/some/local/model") is None
    change = ChangeRecord("HuggingFaceTB/SmolLM2-135M-Instruct", "ab" * 32, "lora", 1, 2)
    change.base_weights_note = note
    assert f"- note: {note}" in render_card(change, "adapter")


def test_records_are_strict_json_when_metrics_diverged(tmp_path: Path) -> None:
    from tilpass.card import ChangeRecord, write_record

    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    change = ChangeRecord("base", None, "lora", 1, 2)
    change.metrics_after = {"loss": float("nan"), "perplexity": float("inf")}
    record = strict_json(write_record(tmp_path, change).read_text())
    assert record["metrics"]["after"] == {"loss": None, "perplexity": None}
