"""Compare a PEFT run with a tilpass run of PEFT's tests: classify failures, write the table.

Only tests that pass on PEFT itself count: a test PEFT skips or fails here (it needs a GPU, a
model hub, a package not installed) says nothing about tilpass. Each tilpass failure among them
is put in one class by its first error:

- research variant: a LoRA variant tilpass does not implement (BD-LoRA, VeLoRA, KaSA, ...);
- needs a model hub: the test reached for a download (the runs are offline);
- PEFT internals: the test read PEFT's object layout (`model.base_model.model`, a layer's
  PEFT-only attributes (one missing on any tilpass layer class that torch's layers do not
  have either: `weight` or `embed_dim` missing is tilpass behaviour), the tuner object's
  methods through `model.base_model`, PEFT's own functions handed a tilpass object, PEFT layer
  classes registered with `_register_custom_module`, a model key in PEFT's in-memory layout
  such as `lin0.lora_A.default.weight`), monkeypatched PEFT's own modules or classes (so it
  checks PEFT's implementation), failed asserting that an object is an instance of one of
  PEFT's classes, or was noted by a probe of `internals_probes.py` (PEFT's private functions
  handed a tilpass object, PEFT's classes looked for among tilpass's layers, private layer
  attributes read), or looked for a private attribute (`_custom_modules`) on a tilpass object
  (PEFT's code handed a tilpass config, say);
  not a user's API; an attribute PEFT's model forwards to the base model (`peft_model.lin0`)
  is not counted here: user code reads those; a tensor treated as PEFT's per-adapter
  module (`layer.lora_A["default"].weight`: PEFT keeps an `nn.Linear` per adapter, tilpass the
  tensor itself); an expected error message (`pytest.raises(match=...)`) that names one of
  PEFT's classes (`<class 'peft.tuners.lora.layer.Linear'>`);
- tilpass behaviour: everything else, the part a user porting PEFT code would meet.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

RESEARCH = "research variant"
HUB = "needs a model hub"
INTERNALS = "PEFT internals"
BEHAVIOUR = "tilpass behaviour"
CLASSES = (BEHAVIOUR, INTERNALS, HUB, RESEARCH)

HUB_PATTERNS = re.compile(
    r"offline|huggingface\.co|LocalEntryNotFound|Repository Not Found|disk cache|couldn't connect"
    r"|not a valid model identifier|HFValidationError|OfflineModeIsEnabled|hf_hub",
    re.IGNORECASE,
)
TILPASS_TYPES = ("LoraLinear", "LoraEmbedding", "LoraLayer", "ModulesToSave", "IA3Linear")
"""tilpass's adapter-layer classes (all of them, from tilpass itself, in `layer_classes`): an
attribute missing on one is an attribute of PEFT's layer classes, unless torch's own layers
have it (`BASE_ATTRIBUTES`)."""


def layer_classes() -> frozenset[str]:
    """The names of every adapter-layer class tilpass defines (subclasses of `AdapterLayer`,
    every method registered), or the fixed list where tilpass cannot be imported."""
    try:
        import tilpass  # noqa: F401  (registers every method and its layers)
        from tilpass.layers import AdapterLayer
    except ImportError:
        return frozenset(TILPASS_TYPES)
    names: set[str] = set()
    todo: list[type] = [AdapterLayer]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return frozenset(names)


def base_attributes() -> frozenset[str]:
    """Attribute names of the torch layers adapters wrap (Linear, Embedding, convolutions,
    MultiheadAttention): a test that reads one on a wrapped module (`embed_dim`, `weight`)
    uses the module's own API, which a wrapper that lacks it does not offer."""
    try:
        from torch import nn
    except ImportError:
        return frozenset()
    layers = (
        nn.Linear(1, 1),
        nn.Embedding(1, 1),
        nn.Conv1d(1, 1, 1),
        nn.Conv2d(1, 1, 1),
        nn.Conv3d(1, 1, 1),
        nn.MultiheadAttention(2, 1),
    )
    return frozenset(name for layer in layers for name in dir(layer))


LAYER_CLASSES = layer_classes()
BASE_ATTRIBUTES = base_attributes()
# `peft_model.model` is PEFT's tuner object's `model` (`model.base_model.model`): its layout.
INTERNAL_ATTRIBUTES = frozenset({"model"})
# PEFT's tuner object (`peft_model.base_model`, a `LoraModel`) has these; tilpass's
# `base_model` is the user's model itself, so a test that calls them through
# `model.base_model` meets a plain module without them. On the model PEFT returns (and on
# tilpass's) they exist; on a plain module they do not exist in PEFT either.
TUNER_ATTRIBUTES = frozenset(
    {
        "set_adapter",
        "active_adapter",
        "active_adapters",
        "peft_config",
        "delete_adapter",
        "disable_adapter_layers",
        "enable_adapter_layers",
        "targeted_module_names",
    }
)
# PEFT's custom-layer dispatch takes classes built on PEFT's layer base classes (its internals).
PRIVATE_HOOKS = frozenset({"_register_custom_module"})
MISSING_ATTRIBUTE = re.compile(r"'(\w+)' object has no attribute '(\w+)'")
# PEFT keeps each adapter's factors as a module (`lora_A["default"]` is an `nn.Linear`);
# tilpass keeps the tensor, so `.weight` / `.bias` on it reads PEFT's layout.
TENSOR_TYPES = frozenset({"Parameter", "Tensor"})
MODULE_ATTRIBUTES = frozenset({"weight", "bias"})
# An expected message naming one of PEFT's classes asks for PEFT's implementation by name.
# (Backslashes are dropped first: the pattern may be `re.escape`d and is recorded as a repr.)
PEFT_CLASS_NAME = re.compile(r"<class 'peft\.")
# PEFT keeps a LoRA factor as an `nn.Linear` in a per-adapter dict, so the model's own state
# dict and parameter names hold `<path>.lora_A.<adapter>.weight`; tilpass holds the factor
# itself (`<path>.lora_A.<adapter>`), and adapter files (both libraries) key it
# `<path>.lora_A.weight`. A missing key of the first form is a read of PEFT's module layout.
PEFT_FACTOR_KEY = re.compile(r"^KeyError: '[\w.]*\blora_\w+\.\w+\.(weight|bias)'")


def classify(record: dict) -> str:
    """The class of one failed tilpass record (see the module docstring)."""
    message = record.get("message", "")
    if record.get("research") or "research variant" in message or "UnsupportedVariant" in message:
        return RESEARCH
    if HUB_PATTERNS.search(message):
        return HUB
    if record.get("peft_internals"):
        return INTERNALS  # it patched PEFT's code or asserted an object is of a PEFT class
    if PEFT_FACTOR_KEY.search(message):
        return INTERNALS  # the model's own keys looked up in PEFT's layout
    found = MISSING_ATTRIBUTE.search(message)
    if found:
        owner, attribute = found.groups()
        if attribute.startswith("_") and not attribute.startswith("__"):
            return INTERNALS  # a private attribute is PEFT's implementation, never user API
        if owner == "AdaptedModel":  # PEFT's API or an attribute PEFT forwards, but `.model`
            return INTERNALS if attribute in INTERNAL_ATTRIBUTES else BEHAVIOUR
        if owner in LAYER_CLASSES and attribute in BASE_ATTRIBUTES:
            return BEHAVIOUR  # the wrapped module's own attribute, not offered by the wrapper
        if owner in LAYER_CLASSES or attribute in INTERNAL_ATTRIBUTES | {"base_model"}:
            return INTERNALS  # a PEFT layer's attributes, or `model.base_model.model`
        if attribute in TUNER_ATTRIBUTES | PRIVATE_HOOKS:
            return INTERNALS  # PEFT's tuner object, or PEFT layer classes plugged in
        if owner in TENSOR_TYPES and attribute in MODULE_ATTRIBUTES:
            return INTERNALS  # `lora_A[name].weight`: PEFT's per-adapter module
        return BEHAVIOUR
    if PEFT_CLASS_NAME.search(record.get("expected", "").replace("\\", "")):
        return INTERNALS  # the test asks for an error message that names PEFT's classes
    if _raised_in_peft(record):
        return INTERNALS
    return BEHAVIOUR


def _raised_in_peft(record: dict) -> bool:
    """The error came from PEFT's own library code (not its tests) handed a tilpass object."""
    path = record.get("path", "").replace("\\", "/")
    return "/peft/" in path and "/tests/" not in path and "/tilpass/" not in path


def normalise(message: str) -> str:
    """An error message with numbers, tensors and addresses masked, for grouping."""
    message = re.sub(r"0x[0-9a-f]+", "0x..", message)
    message = re.sub(r"tensor\(.*", "tensor(...)", message)
    message = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", message)
    return message[:160]


@dataclass
class Selection:
    """Outcomes of one selection of tests under both backends."""

    title: str
    on_peft: int = 0
    on_tilpass: int = 0
    classes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    @property
    def counted(self) -> int:
        """Tests that pass on PEFT, less research variants and PEFT-internals readers."""
        return self.on_peft - self.classes[RESEARCH] - self.classes[INTERNALS]

    @property
    def rate(self) -> float:
        return 100.0 * self.on_tilpass / max(self.counted, 1)


def compare(title: str, peft: list[dict], tilpass: list[dict]) -> Selection:
    """Count, over the tests that pass on PEFT, how many pass on tilpass and why others fail."""
    passing = {r["id"] for r in peft if r["outcome"] == "passed"}
    ours = {r["id"]: r for r in tilpass}
    selection = Selection(title, on_peft=len(passing))
    for test in sorted(passing):
        record = ours.get(test, {"id": test, "outcome": "not run", "message": "not run"})
        if record["outcome"] == "passed":
            selection.on_tilpass += 1
            continue
        kind = classify(record)
        selection.classes[kind] += 1
        if kind == BEHAVIOUR:
            selection.errors[normalise(record.get("message", ""))] += 1
    return selection


def table(selections: list[Selection]) -> str:
    """The Markdown table of pass figures and failure classes."""
    head = (
        "| selection (LoRA-only tests) | pass on PEFT | pass on tilpass | counted* | rate* | "
        + " | ".join(f"fail: {c}" for c in CLASSES)
        + " |"
    )
    lines = [head, "|" + "---|" * (5 + len(CLASSES))]
    for s in selections:
        classes = " | ".join(str(s.classes[c]) for c in CLASSES)
        lines.append(
            f"| {s.title} | {s.on_peft:,} | {s.on_tilpass:,} | {s.counted:,} | "
            f"{s.rate:.1f}% | {classes} |"
        )
    return "\n".join(lines)


def top_errors(selection: Selection, limit: int = 25) -> str:
    """The most frequent first errors of tests in the `tilpass behaviour` class."""
    lines = ["| tests | first error |", "|---|---|"]
    for message, count in selection.errors.most_common(limit):
        shown = message.replace("|", "/").replace("`", "'")
        lines.append(f"| {count} | `{shown}` |")
    return "\n".join(lines)
