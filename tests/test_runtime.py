"""keep_freed_memory: freed large buffers stay mapped for the next training step."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from tilpass.runtime import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(2**25)  # 128 MB, touched
before_free = rss_mb()
del x
print(applied, round(before_free - rss_mb()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_freed_buffers_stay_for_reuse_only_when_asked() -> None:
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    applied, released = run("keep")
    assert applied == "True"
    assert released < 16  # the 128 MB block stays resident, ready for the next step
    applied, released = run("default")
    assert applied == "False"
    assert released > 100  # glibc's default: unmapped on free, page-faulted in again


def test_training_config_exposes_the_switch() -> None:
    from tilpass.train import TrainConfig

    assert TrainConfig().keep_freed_memory is True
    assert TrainConfig(keep_freed_memory=False).keep_freed_memory is False
