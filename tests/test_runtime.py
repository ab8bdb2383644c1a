"""keep_freed_memory: freed large buffers stay mapped for the next training step, but only
when the CLI asks for it (apply_process_settings), never as a side effect of train()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


SETTINGS_PROBE = """
import resource, sys, tempfile, torch
from tilpass.runtime import apply_process_settings
from tilpass.train import TrainConfig, train

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

mode = sys.argv[1]
config = TrainConfig(max_steps=1, batch_size=2, progress_bar=False, keep_freed_memory=True)
if mode == "train":  # the library call, with the setting on: must leave malloc alone
    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.embed(input_ids))

    model = TinyLM()
    items = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2
    def collate(batch):
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {"input_ids": ids, "labels": torch.tensor([b["labels"] for b in batch])}
    with tempfile.TemporaryDirectory() as out:
        train(model, items, None, collate, config, out)
    applied = False
elif mode == "off":
    applied = apply_process_settings(TrainConfig(keep_freed_memory=False), "cpu")
elif mode == "gpu":
    applied = apply_process_settings(config, "cuda")
else:
    applied = apply_process_settings(config, "cpu")
x = torch.ones(2**25)  # 128 MB, touched
before_free = rss_mb()
del x
print(applied, round(before_free - rss_mb()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_process_settings_only_when_the_cli_applies_them() -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}

    def run(mode: str) -> tuple[str, int]:
        proc = subprocess.run(
            [sys.executable, "-c", SETTINGS_PROBE, mode], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout.split()
        return out[-2], int(out[-1])

    applied, released = run("cli")
    assert applied == "True" and released < 16
    for mode in ("train", "off", "gpu"):
        applied, released = run(mode)
        assert applied == "False", mode
        assert released > 100, mode  # glibc's default behaviour is untouched
