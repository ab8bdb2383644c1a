"""Thread count and OpenMP wait policy: the rule, the overrides, and the one restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tilpass.threads import (
    CHOSEN_MARK,
    ThreadChoice,
    ThreadSettingError,
    choose_threads,
    chosen_before_restart,
    needs_restart,
)

ROOT = Path(__file__).resolve().parents[1]


def test_alone_uses_every_core_and_shared_waits_passively_on_fewer() -> None:
    alone = choose_threads(4, 0.2, {})
    assert (alone.threads, alone.wait_policy) == (4, "default")
    assert alone.reason == "0.2 of 4 cores busy: alone"
    assert alone.environment() == {"OMP_NUM_THREADS": "4"}
    shared = choose_threads(2, 1.3, {})
    assert (shared.threads, shared.wait_policy) == (1, "passive")
    assert shared.environment() == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert choose_threads(2, 7.0, {}).threads == 1  # never below one
    assert choose_threads(16, 2.6, {}).threads == 13  # one thread fewer per busy core
    assert shared.describe().startswith(
        "threads: 1, wait policy PASSIVE (1.3 of 2 cores busy: shared; override with"
    )


def test_busy_cores_are_measured_from_the_cpu_counters() -> None:
    """A busy loop in another process shows as at least half a busy core, and the count never
    exceeds the cores (whatever else the machine is doing at the time)."""
    from tilpass.threads import machine_cores, machine_load

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = machine_load()
    finally:
        spinner.kill()
    assert 0.5 <= busy <= machine_cores() + 1e-6, busy


def test_overrides_command_line_then_tilpass_then_openmp_variables() -> None:
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "active", "TILPASS_THREADS": "auto"}
    c = choose_threads(8, 4.0, env)
    assert (c.threads, c.wait_policy) == (3, "active") and c.reason.endswith(", overridden")
    env |= {"TILPASS_THREADS": "5", "TILPASS_WAIT_POLICY": "passive"}
    assert choose_threads(8, 0.0, env) == ThreadChoice(
        5, "passive", "0.0 of 8 cores busy: alone, overridden"
    )
    c = choose_threads(8, 0.0, env, threads="2", wait_policy="default")
    assert (c.threads, c.wait_policy) == (2, "default")
    with pytest.raises(
        ThreadSettingError, match=r"--threads must be a whole number >= 1 or 'auto', got '0'"
    ):
        choose_threads(8, 0.0, {}, threads="0")
    with pytest.raises(
        ThreadSettingError, match="TILPASS_WAIT_POLICY must be one of auto, default"
    ):
        choose_threads(8, 0.0, {"TILPASS_WAIT_POLICY": "lazy"})


def test_a_restart_happens_only_for_a_policy_not_in_force_and_only_once() -> None:
    passive = ThreadChoice(1, "passive", "r")
    assert needs_restart(passive, {})
    assert not needs_restart(passive, {"OMP_WAIT_POLICY": "PASSIVE"})
    assert not needs_restart(passive, {CHOSEN_MARK: "r"})
    assert not needs_restart(ThreadChoice(2, "default", "r"), {})
    assert chosen_before_restart({}) is None
    inherited = {CHOSEN_MARK: "why", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert chosen_before_restart(inherited) == passive.__class__(1, "passive", "why")


def test_the_command_re_runs_itself_once_with_the_passive_policy_in_force() -> None:
    code = (
        "import os, torch\n"
        "from tilpass.threads import configure_threads\n"
        "choice = configure_threads(None, None, may_restart=True)\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads(), choice.reason)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "TILPASS_"))}
    env |= {"TILPASS_WAIT_POLICY": "passive", "TILPASS_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1  # the first process re-ran itself before printing anything
    assert lines[0].startswith("PASSIVE 1 ") and lines[0].endswith(", overridden")
    assert " cores busy: " in lines[0]
