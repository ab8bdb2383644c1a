"""Print the README's command for a CI mark, so CI runs exactly what the README tells users.

A mark is an HTML comment on the line before a fenced code block::

    <!-- ci: main-job -->
    ```bash
    pip install ... && tilpass quickstart
    ```

Usage: ``python3 .ci/readme_commands.py MARK [README]``. It prints the block's text and exits
0, or names what is wrong (mark missing or repeated, no fenced block right after it, empty or
unclosed block) and exits 1. Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MARK = re.compile(r"^\s*<!--\s*ci:\s*(?P<name>[\w.-]+)\s*-->\s*$")
FENCE = re.compile(r"^\s*(?P<fence>```+|~~~+)")


class ReadmeError(Exception):
    """The README lacks the marked block CI needs; the message says which and where."""


def marks(lines: list[str]) -> dict[str, list[int]]:
    """Line indexes (0-based) of every `<!-- ci: NAME -->` mark, by name."""
    found: dict[str, list[int]] = {}
    for index, line in enumerate(lines):
        match = MARK.match(line)
        if match:
            found.setdefault(match["name"], []).append(index)
    return found


def command_for(mark: str, text: str, source: str = "README.md") -> str:
    """The text of the fenced block right after `<!-- ci: mark -->`, without the fences.

    Raises:
        ReadmeError: The mark is missing or repeated, the next line is not a fence, or the
            block is unclosed or empty.
    """
    lines = text.splitlines()
    found = marks(lines)
    where = found.get(mark, [])
    if not where:
        known = ", ".join(sorted(found)) or "none"
        raise ReadmeError(
            f"{source}: no '<!-- ci: {mark} -->' mark (marks present: {known}). Put the mark "
            "on the line right before the fenced block that CI must run."
        )
    if len(where) > 1:
        numbers = ", ".join(str(i + 1) for i in where)
        raise ReadmeError(f"{source}: mark {mark!r} appears on lines {numbers}; keep exactly one")
    start = where[0] + 1
    opening = FENCE.match(lines[start]) if start < len(lines) else None
    if opening is None:
        raise ReadmeError(
            f"{source}:{start}: mark {mark!r} must be followed directly by a fenced code block "
            "(```bash on the next line)"
        )
    fence = opening["fence"]
    for end in range(start + 1, len(lines)):
        if lines[end].strip() == fence:
            body = "\n".join(lines[start + 1 : end]).strip()
            if not body:
                raise ReadmeError(f"{source}:{start + 1}: the block after {mark!r} is empty")
            return body
    raise ReadmeError(f"{source}:{start + 1}: the block after {mark!r} is never closed")


def main(argv: list[str]) -> int:
    """Command-line entry point; see the module docstring."""
    if len(argv) not in (1, 2):
        print("usage: readme_commands.py MARK [README]", file=sys.stderr)
        return 2
    readme = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parents[1] / "README.md"
    try:
        print(command_for(argv[0], readme.read_text(encoding="utf-8"), str(readme)))
    except (ReadmeError, OSError) as exc:
        print(f"readme_commands.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
