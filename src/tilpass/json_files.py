"""Strict JSON for every file tilpass writes: NaN and infinities become null, never bare tokens.

Python's `json` writes `NaN` and `Infinity` by default, which strict JSON readers (browsers,
`jq`, most languages) reject; a diverged metric must not make a record unreadable.
"""

from __future__ import annotations

import json
import math
from typing import Any


def clean_json(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, in nested dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `clean_json(value)`, refusing anything strict JSON cannot hold."""
    return json.dumps(clean_json(value), allow_nan=False, **kwargs)
