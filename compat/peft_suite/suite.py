"""Fetch PEFT's test suite and run it through the tilpass import shim.

The `tests/` folder of a pinned PEFT release's source distribution is fetched from the package
index with pip (its SHA-256 checked), unpacked into a cache directory, and run with pytest in
a subprocess, once with PEFT itself (the reference) and once with PEFT's user-facing names
rebound to tilpass (`peft_suite_plugin.py`). Each run writes one JSON record per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PEFT_VERSION = "0.21.2"
SDIST_SHA256 = "b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e"
VENDORED = REPO / "tests" / "data" / f"peft-{PEFT_VERSION}-tests-sample.tar.gz"
"""The three files the CI sample needs, cut from the sdist (`vendor` rebuilds it)."""
SAMPLE = HERE / "sample.txt"
CUSTOM = "test_custom_models.py"
# Files that need a GPU, a quantization back-end, diffusers or Megatron: never hub-free on CPU.
NOT_CPU = frozenset(
    {
        "test_gpu_examples.py",
        "test_common_gpu.py",
        "test_gptqmodel.py",
        "test_quantization.py",
        "test_stablediffusion.py",
        "test_lora_megatron.py",
        "test_torch_compile.py",
    }
)


def cache_dir() -> Path:
    """Where sdists and unpacked suites are kept (`$TILPASS_CACHE/peft-suite`)."""
    base = os.environ.get("TILPASS_CACHE") or Path.home() / ".cache" / "tilpass"
    return Path(base) / "peft-suite"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist(version: str = PEFT_VERSION) -> Path:
    """The PEFT sdist from the package index (pip download), cached and hash-checked."""
    target = cache_dir() / "sdist"
    path = target / f"peft-{version}.tar.gz"
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"peft=={version}", "-d", str(target)], check=True)
    if version == PEFT_VERSION and sha256(path) != SDIST_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {sha256(path)} is not the pinned {SDIST_SHA256}")
    return path


def unpack(archive: Path, destination: Path, members: set[str] | None = None) -> Path:
    """Unpack the `tests/` files of `archive` into `destination/tests` (made a package, so
    PEFT's relative imports work) and return that folder."""
    tests = destination / "tests"
    if tests.is_dir():
        return tests
    destination.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination)) / "tests"
    tmp.mkdir()
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = _test_file_name(member)
                if name is not None and (members is None or name in members):
                    data = tar.extractfile(member)
                    assert data is not None
                    (tmp / name).write_bytes(data.read())
        (tmp / "__init__.py").touch()
        os.replace(tmp, tests)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return tests


def _test_file_name(member: tarfile.TarInfo) -> str | None:
    """The file name of a Python file directly in the sdist's `tests/` (or at the top of the
    vendored archive), else None."""
    if not member.isfile() or not member.name.endswith(".py"):
        return None
    name = member.name.split("/tests/", 1)[1] if "/tests/" in member.name else member.name
    return None if "/" in name else name


def suite(version: str = PEFT_VERSION) -> Path:
    """PEFT's `tests/` folder, fetched and unpacked once."""
    return unpack(fetch_sdist(version), cache_dir() / f"peft-{version}")


def vendor(version: str = PEFT_VERSION) -> Path:
    """Rebuild the small archive the CI sample runs from (the three files it needs)."""
    tests = suite(version)
    VENDORED.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(VENDORED, "w:gz") as tar:
        for name in (CUSTOM, "testing_common.py", "testing_utils.py"):
            info = tar.gettarinfo(str(tests / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(tests / name, "rb") as handle:
                tar.addfile(info, handle)
    return VENDORED


@dataclass
class Run:
    """One pytest run over a selection of PEFT's tests, with one backend."""

    backend: str  # "tilpass" or "peft"
    tests: Path  # the unpacked tests/ folder
    files: list[str]
    results: Path
    only: Path | None = None
    timeout_s: int | None = None
    src: Path = REPO / "src"  # the tilpass source tree the shim imports

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
            "peft_suite_plugin", "-o", "addopts=", "-o", "filterwarnings=",
            "--continue-on-collection-errors", "--tb=short", "--rootdir",
            str(self.tests.parent), "-c", os.devnull, *[str(self.tests / f) for f in self.files],
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(HERE), str(self.src), env.get("PYTHONPATH", "")]
        env.update(
            PYTHONPATH=os.pathsep.join(p for p in paths if p),
            PEFT_SUITE_BACKEND=self.backend,
            PEFT_SUITE_RESULTS=str(self.results),
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        if self.only is not None:
            env["PEFT_SUITE_ONLY"] = str(self.only)
        return env

    def execute(self) -> tuple[list[dict], float, str]:
        """Run pytest; returns the records, the wall time and pytest's last output lines."""
        start = time.monotonic()
        done = subprocess.run(
            self.command(), cwd=self.tests.parent, env=self.environment(), capture_output=True,
            text=True, timeout=self.timeout_s,
        )  # fmt: skip
        seconds = time.monotonic() - start
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        if not self.results.is_file():
            raise RuntimeError(f"pytest wrote no results (exit code {done.returncode}):\n{tail}")
        return read_results(self.results), seconds, tail


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def other_files(tests: Path) -> list[str]:
    """Every test file but the custom-models one and those that need a GPU or similar."""
    return sorted(
        p.name for p in tests.glob("test_*.py") if p.name != CUSTOM and p.name not in NOT_CPU
    )
