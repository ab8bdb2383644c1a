"""Import every module of the installed tilpass package; fail on any that cannot be imported.

CI runs this in the virtualenv of the README's first command, where tilpass is installed
without extras: a module that imports a package missing from the runtime dependencies fails
here, with the module, the missing package and the line that imports it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """One module that did not import: which, what was missing, and where it was imported."""

    module: str
    error: str
    missing: str | None
    location: str

    def describe(self) -> str:
        """One line for the CI log."""
        what = f"imports {self.missing!r}, which is not installed" if self.missing else "fails"
        return f"FAIL {self.module}: {what} ({self.location}): {self.error}"


def package_dirs(package: str) -> list[str]:
    """The directories of `package`, found without importing it (empty if it is not found)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def failure(module: str, exc: BaseException, roots: list[str]) -> Failure:
    """Describe an import error, locating the deepest line under `roots` (the package's code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    prefixes = tuple(os.path.join(root, "") for root in roots)
    own = [f for f in frames if f.filename.startswith(prefixes)] if prefixes else []
    frame = own[-1] if own else (frames[-1] if frames else None)
    location = f"{frame.filename}:{frame.lineno}" if frame else "unknown location"
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    return Failure(module, f"{type(exc).__name__}: {exc}", missing, location)


def import_all(package: str = "tilpass") -> tuple[list[str], list[Failure]]:
    """Import `package` and all its submodules; return the imported names and the failures."""
    roots = package_dirs(package)
    try:
        root = importlib.import_module(package)
    except Exception as exc:
        return [], [failure(package, exc, roots)]
    imported = [package]
    failures: list[Failure] = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.", onerror=lambda _: None):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failures.append(failure(info.name, exc, roots))
        else:
            imported.append(info.name)
    return imported, failures


def main() -> int:
    """Print one line per failure and a summary; exit 1 if any module failed."""
    imported, failures = import_all()
    for item in failures:
        print(item.describe())
    if failures:
        print(
            f"{len(failures)} tilpass module(s) failed to import; add the missing package to "
            "[project] dependencies in pyproject.toml, or guard an optional import with "
            "try/except ImportError."
        )
        return 1
    print(f"imported all {len(imported)} tilpass modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
