"""`tilpass card --format md|html|pdf`: the reviewer's document of a change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import lora, tiny_llama
from tests.test_cli import tilpass
from tilpass import get_peft_model
from tilpass.card import RECORD_NAME, ChangeRecord, write_card, write_record
from tilpass.card_bundle import DISCLAIMER, build_document, write_bundle
from tilpass.card_render import to_html, to_markdown
from tilpass.cli import main
from tilpass.verify import RecordError

HEADINGS = [
    "1. General description and intended purpose",
    "2. Design of the change",
    "3. Training data",
    "4. Evaluation",
    "5. Compute used",
    "6. Limitations",
    "7. Integrity",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter directory with the card and record a training run writes."""
    directory = tmp_path_factory.mktemp("adapter")
    get_peft_model(tiny_llama(), lora(r=4)).save_pretrained(directory)
    change = ChangeRecord(
        base_model="org/base",
        base_weights_sha256="ab" * 32,
        method="lora",
        trainable_parameters=1_024,
        total_parameters=100_000,
        config={"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        data_files={"data/train.jsonl": "cd" * 32, "data/test.jsonl": "ef" * 32},
        metrics_before={"loss": 2.5, "exact_match": 0.1},
        metrics_after={"loss": 0.5, "exact_match": 0.8},
        steps=12,
        tokens=3_456,
        wall_time_s=7.0,
        task="route <b>symptoms</b> to a specialty",
    )
    write_record(directory, change)
    write_card(directory, change)
    return directory


def test_markdown_has_the_headings_metrics_hashes_and_card(trained: Path) -> None:
    text = to_markdown(build_document(trained))
    found = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert found[: len(HEADINGS)] == HEADINGS
    assert DISCLAIMER in text
    assert "- intended purpose: route <b>symptoms</b> to a specialty" in text
    assert "| loss | 2.5000 | 0.5000 |" in text and "| exact_match | 0.1000 | 0.8000 |" in text
    assert f"| data/train.jsonl | {'cd' * 32} |" in text
    assert f"| base model org/base | {'ab' * 32} |" in text
    assert "| q_proj | 2 | 0-1 | r=4 | 512 |" in text  # read from the adapter file
    assert "- optimizer steps: 12" in text and "- training tokens: 3,456" in text
    assert "# lora adapter for org/base" in text  # the model card, in the appendix


def test_html_escapes_every_text(trained: Path) -> None:
    page = to_html(build_document(trained))
    assert page.startswith("<!DOCTYPE html>")
    assert "route &lt;b&gt;symptoms&lt;/b&gt; to a specialty" in page
    assert "<b>symptoms" not in page
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page


def test_pdf_is_a_pdf_with_pages(trained: Path, tmp_path: Path) -> None:
    out = write_bundle(trained, tmp_path / "doc.pdf", "pdf")
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type /Page\b", data)) >= 2


def test_missing_record_is_an_error_and_nothing_is_written(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((trained / "adapter_config.json").read_text())
    with pytest.raises(RecordError, match="tilpass record"):
        build_document(bare)
    out = tmp_path / "doc.md"
    assert main(["card", str(bare), "--out", str(out)]) == 2
    assert f"{RECORD_NAME}: missing" in capsys.readouterr().err
    assert not out.exists() and not (bare / "documentation.md").exists()


def test_cli_renders_html(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "review.html"
    proc = tilpass("card", str(trained), "--format", "html", "--out", str(out), cwd=tmp_path)
    assert proc.stdout.strip() == f"wrote {out}"
    assert "<h2>4. Evaluation</h2>" in out.read_text()
