"""AdapterHub's bottleneck adapters and tilpass's, timed side by side in one process.

Run by `benchmarks/methods.py` with the python of a separate virtualenv that holds
`adapters` 1.3 and the `transformers` 4.57 it pins (torch comes from the caller's environment
through a `.pth` entry). tilpass is imported from this checkout's `src/` (it supports
transformers >= 4.56), so both libraries run on the same transformers, in one process, and
their forwards interleave round by round: the comparison is a per-round ratio, not two
ratios from two processes.

One random Llama (the spec's config, seed 0) is the base. AdapterHub's model and tilpass's
two models are structural copies that share its weight tensors, so every variant reads the
same base weights from the same memory. AdapterHub adds Houlsby (`DoubleSeqBnConfig`) and
Pfeiffer (`SeqBnConfig`) adapters of the spec's width, perturbed to be non-zero; tilpass's
Houlsby (SiLU, as `swish`) and Pfeiffer (ReLU) get copies of those exact tensors. The two
Houlsby models compute the same function, and their logits must agree before anything is
timed. The two Pfeiffer adapters do the same work (one bottleneck of the same width after
each MLP) on a different input: `SeqBnConfig` sets `original_ln_before`, which on a model
without post-norms feeds the adapter the residual stream plus the MLP output, while tilpass's
reads the MLP output (the adapter's own residual then adds it back); their logit difference
is recorded, not checked. Then base / tilpass / AdapterHub
forwards run in interleaved rounds with a rotating order, and the seconds per round are
written as JSON:

    <venv>/bin/python benchmarks/adapterhub_peer.py --spec spec.json --out peer.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # tilpass, this checkout

from common import interleaved_rounds, package_version, rel_error, shared_copy, timer

# tilpass placement -> (AdapterHub config class, tilpass activation, same function?)
PAIRS = {
    "houlsby": ("DoubleSeqBnConfig", "silu", True),
    "pfeiffer": ("SeqBnConfig", "relu", False),
}
# AdapterHub's per-layer module -> the module tilpass wraps for the same slot
SLOTS = {"attention_adapters": "self_attn.o_proj", "output_adapters": "mlp"}
TOL = 1e-4


def adapterhub_model(base: torch.nn.Module, width: int) -> torch.nn.Module:
    """AdapterHub's model over `base`'s weights, with both adapters added (non-zero)."""
    import adapters

    model = shared_copy(base)
    adapters.init(model)
    factor = base.config.hidden_size // width
    for name, (config_class, _, _) in PAIRS.items():
        model.add_adapter(name, config=getattr(adapters, config_class)(reduction_factor=factor))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapters." in name:  # up projections start at zero: make them do something
                param.add_(torch.randn_like(param) * 0.02)
    return model


def hub_tensor(
    hub: torch.nn.Module, layer: int, slot: str, name: str, part: str, leaf: str
) -> torch.Tensor:
    """One tensor of AdapterHub adapter `name`: `part` adapter_down / adapter_up, `leaf`
    weight / bias."""
    module = hub.get_submodule(f"model.layers.{layer}.{slot}.adapters.{name}.{part}")
    if part == "adapter_down":
        module = module[0]  # Sequential(Linear, activation)
    return getattr(module, leaf)


def tilpass_model(base: torch.nn.Module, hub: torch.nn.Module, name: str, width: int) -> Any:
    """tilpass's adapter of the same placement over `base`'s weights, AdapterHub's tensors
    copied in."""
    import tilpass
    from tilpass.methods.bottleneck import BottleneckConfig

    config = BottleneckConfig(bottleneck_size=width, placement=name, non_linearity=PAIRS[name][1])
    model = tilpass.get_peft_model(shared_copy(base), config)
    slots = SLOTS if name == "houlsby" else {"output_adapters": SLOTS["output_adapters"]}
    for layer in range(base.config.num_hidden_layers):
        for slot, target in slots.items():
            wrapper = model.get_submodule(f"base_model.model.layers.{layer}.{target}")
            copy_adapter(wrapper.bottleneck["default"], hub, layer, slot, name)
    return model.eval()


def copy_adapter(
    ours: torch.nn.Module, hub: torch.nn.Module, layer: int, slot: str, name: str
) -> None:
    """AdapterHub's down / up weights and biases of one slot into tilpass's adapter."""
    with torch.no_grad():
        for part in ("adapter_down", "adapter_up"):
            for leaf in ("weight", "bias"):
                target = getattr(getattr(ours, part), leaf)
                target.copy_(hub_tensor(hub, layer, slot, name, part, leaf))


def check_same_logits(hub: torch.nn.Module, ours: dict[str, Any], vocab: int) -> dict[str, float]:
    """max |tilpass - AdapterHub| / max |AdapterHub| over whole logits, per adapter; stops
    the run where the two should compute the same function and do not."""
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    errors = {}
    hub.set_active_adapters(None)
    with torch.inference_mode():
        plain = hub(input_ids=ids).logits
    for name, model in ours.items():
        hub.set_active_adapters(name)
        with torch.inference_mode():
            theirs, mine = hub(input_ids=ids).logits, model(input_ids=ids).logits
        errors[name] = rel_error(mine, theirs)
        if rel_error(theirs, plain) < 1e-3:
            raise SystemExit(f"{name}: the adapter leaves the logits unchanged; nothing compared")
        if PAIRS[name][2] and errors[name] > TOL:
            raise SystemExit(f"{name}: tilpass and AdapterHub logits differ by {errors[name]:.2e}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON written by methods.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # "no adapters activated" on every base-model call
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**spec["model"])).eval()
    hub = adapterhub_model(base, spec["bottleneck_size"]).eval()
    ours = {name: tilpass_model(base, hub, name, spec["bottleneck_size"]) for name in PAIRS}
    errors = check_same_logits(hub, ours, spec["model"]["vocab_size"])
    results: dict[str, dict[str, list[float]]] = {}
    for batch, length in spec["shapes"]:
        ids = torch.randint(3, spec["model"]["vocab_size"], (batch, length))
        variants = {"base": timer(lambda ids=ids: forward(base, ids), spec["reps"])}
        for name, model in ours.items():
            variants[f"tilpass {name}"] = timer(lambda m=model, i=ids: forward(m, i), spec["reps"])
            variants[f"AdapterHub {name}"] = timer(
                lambda n=name, i=ids: forward(hub, i, n), spec["reps"]
            )
        results[f"{batch}x{length}"] = interleaved_rounds(variants, spec["rounds"])
    versions = {k: package_version(k) for k in ("adapters", "transformers", "torch")}
    out = {"seconds": results, "logit_rel_error": errors, "versions": versions}
    Path(args.out).write_text(json.dumps(out, indent=2))


def forward(model: torch.nn.Module, ids: torch.Tensor, active: str | None = None) -> None:
    """One no-grad forward; `active` selects AdapterHub's adapter (set outside the model call
    for tilpass, whose models each hold one)."""
    if active is not None:
        model.set_active_adapters(active)
    with torch.inference_mode():
        model(input_ids=ids)


if __name__ == "__main__":
    main()
