"""AdapterHub's bottleneck adapters timed on the methods benchmark's model (the peer run).

Run by `benchmarks/methods.py` with the python of a separate virtualenv that holds
`adapters` 1.3 and the `transformers` 4.57 it pins (torch comes from the caller's
environment through a `.pth` entry); it never imports tilpass. It builds the same random Llama,
adds Houlsby (`DoubleSeqBnConfig`) and Pfeiffer (`SeqBnConfig`) adapters with the same
bottleneck width, and times base / Houlsby / Pfeiffer forwards in interleaved rounds, writing
the seconds per round as JSON:

    <venv>/bin/python benchmarks/adapterhub_peer.py --spec spec.json --out peer.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved_rounds, package_version, timer


def build(spec: dict) -> torch.nn.Module:
    """The random Llama of the spec, with AdapterHub's two adapters added (non-zero)."""
    import adapters
    from adapters import DoubleSeqBnConfig, SeqBnConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec["model"])).eval()
    adapters.init(model)
    factor = spec["model"]["hidden_size"] // spec["bottleneck_size"]
    model.add_adapter("houlsby", config=DoubleSeqBnConfig(reduction_factor=factor))
    model.add_adapter("pfeiffer", config=SeqBnConfig(reduction_factor=factor))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter" in name:  # up projections start at zero: make them do something
                param.add_(torch.randn_like(param) * 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON written by methods.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # "no adapters activated" on every base-model call
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(spec["threads"])
    model = build(spec)
    results: dict[str, dict[str, list[float]]] = {}
    for shape in spec["shapes"]:
        batch, length = shape
        ids = torch.randint(3, spec["model"]["vocab_size"], (batch, length))

        def run(active: str | None, ids: torch.Tensor = ids) -> None:
            model.set_active_adapters(active)
            with torch.inference_mode():
                model(input_ids=ids)

        variants = {
            name: timer(lambda n=name: run(None if n == "base" else n), spec["reps"])
            for name in ("base", "houlsby", "pfeiffer")
        }
        results[f"{batch}x{length}"] = interleaved_rounds(variants, spec["rounds"])
    versions = {k: package_version(k) for k in ("adapters", "transformers", "torch")}
    Path(args.out).write_text(json.dumps({"seconds": results, "versions": versions}, indent=2))


if __name__ == "__main__":
    main()
