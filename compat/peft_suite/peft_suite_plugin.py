"""pytest plugin that runs PEFT's own tests against tilpass: the import shim, the LoRA-only
selection and a recorder of each test's outcome and first error.

Loaded with `-p peft_suite_plugin` (this folder on `PYTHONPATH`), before PEFT's test modules
are imported. Settings come from environment variables, so the runner (`run.py`) and the CI
test drive it the same way:

- `PEFT_SUITE_BACKEND`: `tilpass` rebinds PEFT's user-facing names (`LoraConfig`,
  `get_peft_model`, `PeftModel` and the functions tilpass also provides) to tilpass, leaving
  everything else the real installed `peft`; `peft` runs PEFT itself (the reference).
- `PEFT_SUITE_RESULTS`: a JSON Lines file that receives one record per test.
- `PEFT_SUITE_ONLY`: optional file of test ids (one per line); only those run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from internals_probes import LayoutProbes, watch_private_functions

# Names PEFT users import from `peft` that tilpass provides under the same name.
SHIMMED = (
    "PeftConfig",
    "LoraConfig",
    "get_peft_model",
    "PeftModel",
    "PeftType",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "inject_adapter_in_model",
    "get_layer_status",
    "get_model_status",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "PeftWarning",
    "PeftError",
    "NoMatchingPeftModuleError",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
)
SHIMMED_IN_MODULES = {
    "peft.optimizers": ("create_loraplus_optimizer", "create_lorafa_optimizer"),
    "peft.utils.hotswap": ("hotswap_adapter", "prepare_model_for_compiled_hotswap"),
}
"""User-facing functions PEFT's users import from a submodule, by module (tilpass has them at
its top level)."""

# LoRA fields and test-name fragments of research variants tilpass does not implement.
RESEARCH_KEYS = frozenset(
    {
        "use_bdlora",
        "bdlora_config",
        "velora_config",
        "kasa_config",
        "monteclora_config",
        "use_mica",
        "corda_config",
        "lora_ga_config",
        "eva_config",
        "use_qalora",
        "qalora_group_size",
        "alora_invocation_tokens",
        "arrow_config",
        "megatron_config",
    }
)
RESEARCH_INITS = frozenset({"eva", "corda", "mica", "lora_ga"})
"""`init_lora_weights` values of research variants."""
RESEARCH_NAMES = re.compile(
    r"bdlora|velora|kasa|monteclora|mica|corda|lora_?ga|loraga|\beva\b|_eva_|qalora|alora|arrow",
    re.IGNORECASE,
)


def _stub_missing_modules() -> None:
    """PEFT's shared test helpers import diffusers at module level; without it installed no
    test would even be collected, so an empty stand-in is put in its place (the tests that
    use diffusers are not LoRA-on-custom-model tests and fail on their own)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # type: ignore[attr-defined]
        stub.__version__ = "0.0.0"  # type: ignore[attr-defined]  # some files compare it
        sys.modules["diffusers"] = stub


def _install_shim() -> list[str]:
    """Rebind PEFT's user-facing names to tilpass's; returns the names rebound."""
    import peft

    import tilpass

    rebound = []
    for name in SHIMMED:
        if hasattr(tilpass, name):
            setattr(peft, name, getattr(tilpass, name))
            rebound.append(name)
    for module_name, names in SHIMMED_IN_MODULES.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(tilpass, name):
                setattr(module, name, getattr(tilpass, name))
                rebound.append(f"{module_name}.{name}")
    return rebound


NOT_FORWARDED = frozenset({"model"})
"""PEFT's `peft_model.model` is its tuner object (whose `.model` is the base): PEFT's layout."""


class _Forwarding:
    """PEFT's model hands unknown attributes on to the base model (`peft_model.lin0`); tilpass's
    does not, by design. So that such a test shows what it goes on to check, the harness (never
    tilpass) forwards reads made in PEFT's test files and notes them: a test that needed it never
    counts as a tilpass pass (its record says what a plain tilpass run raises), and one that
    fails later is classed by that later error."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}

    def install(self, current: _InternalsRecorder) -> None:
        from tilpass import AdaptedModel

        module_getattr = nn_module_getattr()
        names = self.names

        def getattr_forwarding(model: Any, name: str) -> Any:
            try:
                return module_getattr(model, name)
            except AttributeError:
                caller = Path(sys._getframe(1).f_code.co_filename)
                # `.get`: a read before `__init__` ran (a wrapped constructor) finds no modules
                base = model.__dict__.get("_modules", {}).get("base_model")
                if current.current is None or caller.parent.name != "tests" or base is None:
                    raise
                if "site-packages" in caller.parts or name in NOT_FORWARDED:
                    raise
                if not hasattr(base, name):
                    raise
                names.setdefault(current.current, []).append(name)
                return getattr(base, name)

        AdaptedModel.__getattr__ = getattr_forwarding  # type: ignore[method-assign]

    def settle(self, record: dict[str, Any]) -> None:
        """Mark a test that read a forwarded attribute; if it passed, record the error a plain
        tilpass run raises at the first such read."""
        used = self.names.get(record["id"])
        if not used:
            return
        record["forwarded"] = sorted(set(used))
        if record["outcome"] == "passed":
            record.update(
                outcome="failed",
                message=f"AttributeError: 'AdaptedModel' object has no attribute '{used[0]}' "
                "(PEFT's model forwards it to the base model)",
                path="",
                frames=[],
            )


def nn_module_getattr() -> Any:
    from torch import nn

    return nn.Module.__getattr__


def _is_peft_object(target: object) -> bool:
    """Whether `target` (a monkeypatch target) is part of PEFT itself: one of its modules (or
    a dotted path into one), or a class or function defined in one."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, types.ModuleType):
        name = target.__name__
    else:
        name = getattr(target, "__module__", None) or ""
    return name == "peft" or name.startswith("peft.")


class _InternalsRecorder:
    """Notes tests that check PEFT's implementation rather than the API tilpass mirrors: those
    that monkeypatch PEFT's own modules or classes (its version lookup, its helpers), and those
    whose failing assertion is an `isinstance` check against one of PEFT's own classes (tilpass's
    layers are its own classes). Maps test id -> the reason."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.reasons: dict[str, str] = {}
        self.original = pytest.MonkeyPatch.setattr
        self.entering = mock._patch.__enter__  # `mock.patch(...)`, `mock.patch.object(...)`

    def install(self) -> None:
        original, entering, recorder = self.original, self.entering, self

        def setattr_recorded(patch: pytest.MonkeyPatch, target: Any, *args: Any, **kw: Any) -> Any:
            if recorder.current is not None and _is_peft_object(target):
                recorder.reasons.setdefault(recorder.current, "monkeypatches PEFT")
            return original(patch, target, *args, **kw)

        pytest.MonkeyPatch.setattr = setattr_recorded  # type: ignore[method-assign]

        def enter_recorded(patcher: Any) -> Any:
            if recorder.current is not None:
                try:
                    target = patcher.getter()
                except Exception:  # the patch itself will report a bad target
                    target = None
                if _is_peft_object(target):
                    recorder.reasons.setdefault(recorder.current, "monkeypatches PEFT")
            return entering(patcher)

        mock._patch.__enter__ = enter_recorded  # type: ignore[method-assign]

    def uninstall(self) -> None:
        pytest.MonkeyPatch.setattr = self.original  # type: ignore[method-assign]
        mock._patch.__enter__ = self.entering  # type: ignore[method-assign]

    def check_failure(self, nodeid: str, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        """Note a failed `assert isinstance(x, C)` where C is one of PEFT's classes."""
        if not excinfo.errisinstance(AssertionError):
            return
        entry = excinfo.traceback[-1]
        try:
            statement = str(entry.statement)
        except Exception:  # no source to read: nothing to note
            return
        for dotted in re.findall(r"isinstance\([^,]+,\s*([\w.]+)\s*\)", statement):
            head, *rest = dotted.split(".")
            names = {**entry.frame.f_globals, **entry.frame.f_locals}
            found = names.get(head)
            for part in rest:
                found = getattr(found, part, None)
            if isinstance(found, type) and _is_peft_object(found):
                self.reasons.setdefault(nodeid, f"isinstance of PEFT's {found.__name__}")
                return


_INTERNALS = _InternalsRecorder()
_FORWARDING = _Forwarding()


def _note_internals(reason: str) -> None:
    """Note that the running test looks at PEFT's implementation (see `internals_probes`)."""
    if _INTERNALS.current is not None:
        _INTERNALS.reasons.setdefault(_INTERNALS.current, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _INTERNALS.current = item.nodeid
    yield
    _INTERNALS.current = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    yield
    if call.excinfo is not None and call.when == "call":
        _INTERNALS.check_failure(item.nodeid, call.excinfo)


def pytest_configure(config: pytest.Config) -> None:
    _INTERNALS.install()
    _stub_missing_modules()
    backend = os.environ.get("PEFT_SUITE_BACKEND", "tilpass")
    if backend not in ("tilpass", "peft"):
        raise pytest.UsageError(f"PEFT_SUITE_BACKEND must be 'tilpass' or 'peft', not {backend!r}")
    config.stash[_STATE] = _State(backend, _install_shim() if backend == "tilpass" else [])
    if backend == "tilpass":
        _FORWARDING.install(_INTERNALS)
        from tilpass.layers import AdapterLayer

        LayoutProbes(_note_internals, AdapterLayer).install()


class _State:
    """What the plugin knows during one session: the backend and where results go."""

    def __init__(self, backend: str, rebound: list[str]) -> None:
        self.backend = backend
        self.rebound = rebound
        path = os.environ.get("PEFT_SUITE_RESULTS")
        self.results = Path(path) if path else None
        self.info: dict[str, dict[str, Any]] = {}
        self.done: dict[str, dict[str, Any]] = {}


_STATE = pytest.StashKey[_State]()


# -- selection ---------------------------------------------------------------------------------
def _config_names() -> set[str]:
    """The names of every PEFT method's config class (to tell LoRA tests from the others)."""
    import peft

    names = {n for n in dir(peft) if n.endswith("Config") and n[:1].isupper()}
    return names - {"PeftConfig", "PromptLearningConfig", "LoraConfig"}


def _param_configs(item: pytest.Item) -> list[str] | None:
    """Names of config classes in the item's parameters; None if it has none."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    found = []
    for value in callspec.params.values():
        cls = value if isinstance(value, type) else type(value)
        if cls.__name__.endswith("Config") and cls.__module__.split(".")[0] in ("peft", "tilpass"):
            found.append(cls.__name__)
    return found or None


def _source_configs(item: pytest.Item, others: set[str]) -> set[str]:
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        source = ""
    used = set(re.findall(r"\b([A-Z]\w*Config)\b", source))
    return used & (others | {"LoraConfig"})


def is_lora_only(item: pytest.Item, others: set[str]) -> bool:
    """A test of LoRA alone: its config parameter is LoraConfig, or (unparametrized) its
    source names LoraConfig and no other method's config."""
    params = _param_configs(item)
    if params is not None:
        return all(p == "LoraConfig" for p in params)
    return _source_configs(item, others) == {"LoraConfig"}


def is_research(item: pytest.Item) -> bool:
    """A test of a LoRA research variant (BD-LoRA, VeLoRA, KaSA, MonteCLoRA, MiCA, CorDA,
    LoRA-GA, EVA, ...), by its config fields or its name."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for value in callspec.params.values():
            if isinstance(value, dict) and (
                RESEARCH_KEYS & set(value) or str(value.get("init_lora_weights")) in RESEARCH_INITS
            ):
                return True
    return bool(RESEARCH_NAMES.search(item.nodeid.split("::", 1)[-1]))


@contextlib.contextmanager
def _stay_offline(model_id: str) -> Iterator[None]:
    """Stands in for PEFT's `hub_online_once`, which switches the hub on for a model's first
    use (and again after every failure): here each such test fails at once, offline, instead
    of waiting for network timeouts; it needs a hub either way."""
    yield


def _keep_offline() -> None:
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "tests" and hasattr(module, "hub_online_once"):
            module.hub_online_once = _stay_offline  # type: ignore[attr-defined]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    _keep_offline()
    state = config.stash[_STATE]
    only_file = os.environ.get("PEFT_SUITE_ONLY")
    only = set(Path(only_file).read_text().split("\n")) - {""} if only_file else None
    others = _config_names()
    keep, drop = [], []
    for item in items:
        wanted = item.nodeid in only if only is not None else is_lora_only(item, others)
        (keep if wanted else drop).append(item)
        if wanted:
            state.info[item.nodeid] = {"research": is_research(item)}
    items[:] = keep
    if state.backend == "tilpass":
        for module in {id(m): m for m in (getattr(i, "module", None) for i in keep) if m}.values():
            watch_private_functions(module, _note_internals)
    if drop:
        config.hook.pytest_deselected(items=drop)


# -- recording ---------------------------------------------------------------------------------
def _first_error(report: pytest.TestReport) -> dict[str, Any]:
    """The exception line and where it was raised, from a failed report."""
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        message, path = crash.message, str(crash.path)
    elif isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        message, path = str(longrepr[2]), str(longrepr[0])
    else:
        message, path = str(longrepr).strip().splitlines()[-1:] or [""], ""
        message = message[0] if isinstance(message, list) else message
    frames = []
    chain = getattr(longrepr, "chain", None)
    if chain:
        entries = chain[-1][0].reprentries
        frames = [str(getattr(e.reprfileloc, "path", "")) for e in entries if e.reprfileloc]
    first = {
        "message": message.strip().splitlines()[0][:400] if message else "",
        "path": path,
        "frames": frames[-8:],
    }
    expected = expected_pattern(message or "")
    if expected is not None:
        first["expected"] = expected
    return first


def expected_pattern(message: str) -> str | None:
    """The pattern a failed `pytest.raises(..., match=...)` / `pytest.warns(match=...)`
    expected (pytest writes it on an `Expected regex:` line, `Regex:` in older versions, after
    "Regex pattern did not match."), so the report can tell what wording the test asked for."""
    found = re.search(r"^\s*(?:Expected regex|Regex): (.+)$", message, re.MULTILINE)
    return found.group(1)[:400] if found else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get("config")
    if config is None:
        return
    state = config.stash[_STATE]
    record = state.done.get(report.nodeid)
    if record is None:
        record = {"id": report.nodeid, "outcome": "passed", "seconds": 0.0}
        record.update(state.info.get(report.nodeid, {}))
        state.done[report.nodeid] = record
    record["seconds"] = round(record["seconds"] + report.duration, 4)
    if report.nodeid in _INTERNALS.reasons:
        record["peft_internals"] = _INTERNALS.reasons[report.nodeid]
    if record["outcome"] != "passed":
        return  # keep the first error only
    if report.skipped and not hasattr(report, "wasxfail"):
        record["outcome"] = "skipped"
        record.update(_first_error(report))
    elif report.failed:
        record["outcome"] = "failed" if report.when == "call" else "error"
        record.update(_first_error(report))
    elif hasattr(report, "wasxfail"):
        record["outcome"] = "xfailed" if report.skipped else "xpassed"


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    """Append the finished test's record at once, so a run cut short keeps what it measured."""
    config = _CONFIG.get("config")
    if config is None:
        return
    state = config.stash[_STATE]
    record = state.done.get(nodeid)
    if state.results is None or record is None:
        return
    _FORWARDING.settle(record)
    state.results.parent.mkdir(parents=True, exist_ok=True)
    with state.results.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
