"""CPU thread count and OpenMP wait policy for training, chosen from what the machine is doing.

OpenMP worker threads spin while they wait for work. Alone on a machine that is fastest; beside
another busy process the spinning threads take its CPU time and it takes theirs (12 training
steps of the default model went from 17 s alone to 58 s beside one single-threaded busy process
on the machine where this was measured; with ``OMP_WAIT_POLICY=PASSIVE`` 32 s, at about 15 %
cost when alone). So at start-up the ``tilpass`` command measures how many cores other
processes keep busy right now (from ``/proc/stat`` over a quarter of a second; the 1-minute
load average where that file is missing, which also remembers work that has just ended, such
as the ``pip install`` before a first run):

- below 0.5 busy cores (alone): every core, the OpenMP runtime's default waiting (spin, then
  sleep);
- otherwise (shared): ``OMP_WAIT_POLICY=PASSIVE`` and one thread fewer per busy core
  (``cores - round(busy)``, at least 1).

OpenMP reads its wait policy once, when torch loads it, so the command sets the variable and
re-runs itself once (see :func:`needs_restart`) when the policy it chose is not the one in
force. Overrides, strongest first: ``--threads`` / ``--wait-policy`` on the command line, then
``TILPASS_THREADS`` / ``TILPASS_WAIT_POLICY``, then ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY``
set by the user. The library itself (``tilpass.train``) never changes these settings.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

POLICIES = ("auto", "default", "passive", "active")
CHOSEN_MARK = "TILPASS_THREADS_CHOSEN"  # set once the command has re-run itself
SHARED_LOAD = 0.5  # busy cores (of other processes) from which the machine counts as shared
SAMPLE_S = 0.25  # how long /proc/stat is watched


class ThreadSettingError(ValueError):
    """A thread count or wait policy that cannot be used."""


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count and OpenMP wait policy a run uses, and why."""

    threads: int
    wait_policy: str  # "default" (the runtime's spin-then-sleep), "passive" or "active"
    reason: str

    def describe(self) -> str:
        """The banner line."""
        policy = "OpenMP default" if self.wait_policy == "default" else self.wait_policy.upper()
        return (
            f"threads: {self.threads}, wait policy {policy} ({self.reason}; override with "
            "--threads / --wait-policy or TILPASS_THREADS / TILPASS_WAIT_POLICY)"
        )

    def environment(self) -> dict[str, str]:
        """The OpenMP variables that put this choice in force in a new process."""
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.wait_policy != "default":
            env["OMP_WAIT_POLICY"] = self.wait_policy.upper()
        return env


def machine_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_load() -> float:
    """How many cores are busy now: from ``/proc/stat`` over `SAMPLE_S` seconds (this process
    is idle meanwhile), else the 1-minute load average (0.0 where the system has neither)."""
    try:
        first = _cpu_times()
        time.sleep(SAMPLE_S)
        second = _cpu_times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    busy, total = (b - a for a, b in zip(first, second, strict=True))
    return machine_cores() * busy / total if total > 0 else 0.0


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores together, from the first line of ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _parse_threads(value: str, where: str) -> int | None:
    if value.strip().lower() in ("", "auto"):
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ThreadSettingError(f"{where} must be a whole number >= 1 or 'auto', got {value!r}")
    return threads


def _parse_policy(value: str, where: str) -> str | None:
    policy = value.strip().lower() or "auto"
    if policy not in POLICIES:
        raise ThreadSettingError(f"{where} must be one of {', '.join(POLICIES)}, got {value!r}")
    return None if policy == "auto" else policy


def choose_threads(
    cores: int,
    load: float,
    env: Mapping[str, str],
    threads: str | None = None,
    wait_policy: str | None = None,
) -> ThreadChoice:
    """The thread count and wait policy for a run (see the module docstring for the rule).

    Args:
        cores: CPU cores available; load: how many cores other processes keep busy.
        env: The environment (``TILPASS_*`` and ``OMP_*`` overrides).
        threads, wait_policy: Command-line values (``"auto"`` or None: not given).

    Raises:
        ThreadSettingError: an override that is not a count >= 1 / a known policy.
    """
    shared = load >= SHARED_LOAD
    auto_threads = max(1, cores - round(load)) if shared else cores
    auto_policy = "passive" if shared else "default"
    reason = f"{load:.1f} of {cores} cores busy: {'shared' if shared else 'alone'}"
    n = _parse_threads(threads or "", "--threads")
    if n is None:
        n = _parse_threads(env.get("TILPASS_THREADS", ""), "TILPASS_THREADS")
    if n is None and env.get("OMP_NUM_THREADS", "").strip():
        n = _parse_threads(env["OMP_NUM_THREADS"].split(",")[0], "OMP_NUM_THREADS")
    policy = _parse_policy(wait_policy or "", "--wait-policy")
    if policy is None:
        policy = _parse_policy(env.get("TILPASS_WAIT_POLICY", ""), "TILPASS_WAIT_POLICY")
    if policy is None and env.get("OMP_WAIT_POLICY", "").strip():
        policy = _parse_policy(env["OMP_WAIT_POLICY"], "OMP_WAIT_POLICY")
    if n is not None or policy is not None:
        reason += ", overridden"
    return ThreadChoice(n or auto_threads, policy or auto_policy, reason)


def needs_restart(choice: ThreadChoice, env: Mapping[str, str]) -> bool:
    """Whether the process must re-run itself for ``choice``'s wait policy to take effect.

    OpenMP has read ``OMP_WAIT_POLICY`` already (torch is loaded); a different policy needs a
    new process, and the command re-runs itself at most once (``TILPASS_THREADS_CHOSEN``).
    """
    if env.get(CHOSEN_MARK):
        return False
    in_force = env.get("OMP_WAIT_POLICY", "").strip().lower() or "default"
    return in_force != choice.wait_policy


def apply_threads(choice: ThreadChoice, env: MutableMapping[str, str]) -> None:
    """Set the thread count in torch and the OpenMP variables for child processes."""
    import torch

    env.update(choice.environment())
    if choice.wait_policy == "default":
        env.pop("OMP_WAIT_POLICY", None)
    torch.set_num_threads(choice.threads)


def chosen_before_restart(env: Mapping[str, str]) -> ThreadChoice | None:
    """The choice a re-run process inherited from the run that chose it (None if none)."""
    reason = env.get(CHOSEN_MARK)
    if not reason:
        return None
    threads = _parse_threads(env.get("OMP_NUM_THREADS", ""), "OMP_NUM_THREADS") or 1
    policy = _parse_policy(env.get("OMP_WAIT_POLICY", ""), "OMP_WAIT_POLICY") or "default"
    return ThreadChoice(threads, policy, reason)


def configure_threads(
    threads: str | None, wait_policy: str | None, may_restart: bool
) -> ThreadChoice:
    """Choose and apply the thread settings for a training command; returns the choice.

    With ``may_restart`` (a real command line, not an in-process call) the process re-runs
    itself once, with the same arguments, when the chosen wait policy is not in force.
    """
    env = os.environ
    choice = chosen_before_restart(env)
    if choice is None:
        choice = choose_threads(machine_cores(), machine_load(), env, threads, wait_policy)
        if may_restart and needs_restart(choice, env):
            apply_threads(choice, env)
            env[CHOSEN_MARK] = choice.reason
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    apply_threads(choice, env)
    return choice
