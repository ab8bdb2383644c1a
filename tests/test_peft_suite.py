"""The PEFT compatibility harness (`compat/peft_suite/`): its failure classes, and the fixed
sample of PEFT's own tests, run through the import shim in a real pytest subprocess.

The sample's three PEFT test files ship in `tests/data/` (cut from PEFT's source distribution
by `python compat/peft_suite/run.py vendor`), so this runs offline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from unittest import mock

import pytest
from torch import nn

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "compat" / "peft_suite"
sys.path.insert(0, str(HARNESS))

import peft_suite_plugin  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import suite  # noqa: E402


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"message": "AttributeError: 'AdaptedModel' object has no attribute 'model'"},
         report.INTERNALS),
        ({"message": "AttributeError: 'LoraLinear' object has no attribute 'scaling'"},
         report.INTERNALS),
        ({"message": "AttributeError: 'AdaptedModel' object has no attribute 'lin0'"},
         report.BEHAVIOUR),
        ({"message": "AttributeError: 'AdaptedModel' object has no attribute 'unload'"},
         report.BEHAVIOUR),
        ({"message": "AttributeError: 'MLP' object has no attribute 'model'"}, report.INTERNALS),
        ({"message": "AttributeError: 'DeepMLP' object has no attribute 'set_adapter'"},
         report.INTERNALS),
        ({"message": "AttributeError: 'LoraConfig' object has no attribute "
                     "'_register_custom_module'"}, report.INTERNALS),
        ({"message": "AttributeError: 'MLP' object has no attribute 'lin9'"}, report.BEHAVIOUR),
        ({"message": "OSError: We couldn't connect to 'https://huggingface.co'"}, report.HUB),
        ({"message": "TypeError: unexpected keyword", "research": True}, report.RESEARCH),
        ({"message": "AssertionError: assert False",
          "path": "/venv/site-packages/peft/tuners/lora/model.py"}, report.INTERNALS),
        ({"message": "AssertionError: assert False", "path": "/x/tests/test_custom_models.py"},
         report.BEHAVIOUR),
        ({"message": "AssertionError: assert False", "peft_internals": "monkeypatches PEFT"},
         report.INTERNALS),
        ({"message": "KeyError: 'base_model.model.lin1.lora_A.default.weight'"},
         report.INTERNALS),
        ({"message": "KeyError: 'base_model.model.lin1.lora_A.weight'"}, report.BEHAVIOUR),
        ({"message": "KeyError: 'base_model.model.lin1.modules_to_save.default.weight'"},
         report.BEHAVIOUR),
    ],
)  # fmt: skip
def test_failures_are_classified(record: dict, expected: str) -> None:
    assert report.classify(record) == expected


def test_peft_s_per_adapter_modules_and_class_names_are_peft_internals() -> None:
    """`lora_A["default"].weight` reads PEFT's per-adapter nn.Linear (tilpass keeps the
    tensor); an expected message naming PEFT's classes asks for PEFT's implementation."""
    pattern = re.escape("a <class 'peft.utils.other.ModulesToSaveWrapper'>")
    with (
        pytest.raises(AssertionError) as failed,
        pytest.raises(ValueError, match=pattern),
    ):
        raise ValueError("modules_to_save entry 'foobar' matches no module")
    expected = peft_suite_plugin.expected_pattern(str(failed.value))
    assert expected is not None
    assert "<class 'peft.utils.other.ModulesToSaveWrapper'>" in expected.replace("\\", "")
    mismatch = "AssertionError: Regex pattern did not match."
    cases = [
        ({"message": "AttributeError: 'Parameter' object has no attribute 'weight'"}, True),
        ({"message": "AttributeError: 'Tensor' object has no attribute 'bias'"}, True),
        ({"message": "AttributeError: 'Parameter' object has no attribute 'lora_A'"}, False),
        ({"message": mismatch, "expected": expected}, True),
        ({"message": mismatch, "expected": "'lora_bias=True is not supported'"}, False),
        ({"message": mismatch}, False),
    ]
    for record, internal in cases:
        assert report.classify(record) == (report.INTERNALS if internal else report.BEHAVIOUR)
    assert peft_suite_plugin.expected_pattern("AssertionError: assert 1 == 2") is None


def test_compare_counts_only_tests_that_pass_on_peft() -> None:
    peft = [
        {"id": "a", "outcome": "passed"},
        {"id": "b", "outcome": "passed"},
        {"id": "c", "outcome": "skipped"},
        {"id": "d", "outcome": "passed"},
    ]
    ours = [
        {"id": "a", "outcome": "passed"},
        {"id": "b", "outcome": "failed", "message": "ValueError: x"},
        {"id": "c", "outcome": "passed"},
        {"id": "d", "outcome": "failed", "message": "'MLP' object has no attribute 'model'"},
    ]
    selection = report.compare("t", peft, ours)
    assert (selection.on_peft, selection.on_tilpass, selection.counted) == (3, 1, 2)
    assert selection.rate == 50.0
    assert "| t | 3 | 1 | 2 | 50.0% | 1 | 1 | 0 | 0 |" in report.table([selection])


def test_tests_of_peft_s_implementation_are_noted() -> None:
    peft = pytest.importorskip("peft")
    from peft.utils import ModulesToSaveWrapper

    recorder = peft_suite_plugin._InternalsRecorder()
    recorder.install()
    try:
        recorder.current = "patches"
        patch = pytest.MonkeyPatch()
        patch.setattr(peft.config, "__version__", "1")  # a PEFT module
        patch.setattr(report, "RESEARCH", "x")  # not PEFT: not noted
        patch.undo()
        recorder.current = "mocks"
        with mock.patch("peft.config._get_commit_hash", return_value=None):
            pass
        recorder.current = "mocks elsewhere"
        with mock.patch.object(report, "RESEARCH", "x"):
            pass
    finally:
        recorder.uninstall()
    for checked in (ModulesToSaveWrapper, nn.Linear):
        try:
            assert isinstance(object(), checked)
        except AssertionError:
            recorder.check_failure(checked.__name__, pytest.ExceptionInfo.from_current())
    assert recorder.reasons == {
        "patches": "monkeypatches PEFT",
        "mocks": "monkeypatches PEFT",
        "ModulesToSaveWrapper": "isinstance of PEFT's ModulesToSaveWrapper",
    }


def test_full_runs_one_selection_or_both(tmp_path: Path) -> None:
    for name in (
        "test_custom_models.py",
        "test_config.py",
        "test_other.py",
        "test_gpu_examples.py",
    ):
        (tmp_path / name).touch()
    others = ["test_config.py", "test_other.py"]
    assert run.selected_groups(tmp_path, False, True) == {"others": others}
    assert run.selected_groups(tmp_path, True, False) == {"custom": ["test_custom_models.py"]}
    assert list(run.selected_groups(tmp_path, False, False)) == ["custom", "others"]
    for command in ("full", "report"):  # both commands take the options, refused together
        with pytest.raises(SystemExit, match="exclude each other"):
            run.main([command, "--custom-only", "--others-only"])


def test_write_docs_replaces_only_the_selection_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = tmp_path / "compatibility.md"
    custom, others = run.MARKERS["custom"], run.MARKERS["others"]
    doc.write_text(
        f"intro\n{custom[0]}\ncustom figures\n{custom[1]}\n{others[0]}\nold\n{others[1]}\n"
    )
    results = tmp_path / "results"
    results.mkdir()
    (results / "others-tilpass.jsonl").write_text("")
    (results / "others-tilpass.seconds").write_text("42\n")
    (results / "others-tilpass.command").write_text("python compat/peft_suite/run.py full -x\n")
    monkeypatch.setattr(run, "DOC", doc)
    monkeypatch.setattr(run, "results_dir", lambda: results)
    peft = [{"id": "a", "outcome": "passed"}, {"id": "b", "outcome": "passed"}]
    ours = [{"id": "a", "outcome": "passed"}, {"id": "b", "outcome": "failed", "message": "E: x"}]
    run.write_docs({"others": report.compare("other test files", peft, ours)})
    text = doc.read_text()
    assert "custom figures" in text and "old" not in text
    assert "| other test files | 2 | 1 | 2 | 50.0% | 1 | 0 | 0 | 0 |" in text
    assert "`python compat/peft_suite/run.py full -x`" in text and "tilpass 42." in text
    assert text.index(others[0]) < text.index("| other test files") < text.index(others[1])


def test_report_of_a_passing_only_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peft = [{"id": "a", "outcome": "passed"}] + [
        {"id": f"h{i}", "outcome": "failed"} for i in range(4)
    ]
    (tmp_path / "others-peft.jsonl").write_text("\n".join(json.dumps(r) for r in peft))
    (tmp_path / "others-tilpass.jsonl").write_text(json.dumps({"id": "a", "outcome": "passed"}))
    monkeypatch.setattr(run, "results_dir", lambda: tmp_path)
    args = run.argparse.Namespace(custom_only=False, others_only=True, top=5, write_docs=False)
    selection = run.report_only(args)["others"]
    assert selection.title.endswith("(tilpass run on the 1 cases that pass on PEFT)")
    assert (selection.on_peft, selection.on_tilpass, selection.rate) == (1, 1, 100.0)


@pytest.mark.slow
def test_fixed_sample_of_peft_tests_passes_on_tilpass() -> None:
    assert metadata.version("peft") == suite.PEFT_VERSION, (
        f"the sample runs PEFT {suite.PEFT_VERSION}'s tests against the installed peft; install "
        f"peft=={suite.PEFT_VERSION} (the [test] extra pins it)"
    )
    rows = [line.split("\t") for line in suite.SAMPLE.read_text().splitlines() if line]
    assert len(rows) >= 200 and all(mark in ("pass", "fail") for mark, _ in rows)
    done = subprocess.run(
        [sys.executable, str(HARNESS / "run.py"), "sample"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    # Every case that passed when the sample was made must still pass.
    assert done.returncode == 0, output[-6000:]
    assert " 0 regressions" in output, output[-6000:]
