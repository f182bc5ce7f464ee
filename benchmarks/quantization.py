"""Memory of the frozen base model and a round's time, unquantised and quantised.

For each ``quantization`` (none, 8bit: LLM.int8(); 4bit: QLoRA's NF4 with double
quantisation) this loads the base model as a client does (``fedalora.models``) and
reports its parameter and buffer bytes (transformers' ``get_memory_footprint``), then
runs one federated round in this process (``server.in_process``: the same ServerApp,
strategy and ClientApp) and reports the round's seconds from ``rounds.jsonl``. Default:
the packaged SmolLM2-135M-Instruct, whole, on the instruction data, 3 clients of ranks
16, 8, 4 with Fed-ALoRA, 4 local steps of batch 4 (48 tokens).

    python benchmarks/quantization.py [--model smollm2] [--modes none,8bit,4bit]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

from common import ROOT, machine, print_figures

from fedalora.models import load_base_model
from fedalora.outputs import read_jsonl
from server.in_process import run_in_process

RUN_CONFIG = (
    "dataset='instructions' partitioning='iid' ranks='16,8,4' num-server-rounds=1 "
    "local-steps=4 batch-size=4 max-length=48 max-new-tokens=4 test-fraction=0.05 "
    "fraction-evaluate=0.0 export-adapters=false"
)


def base_model_mib(model: str, quantization: str, num_labels: int) -> float:
    """The base model's parameter and buffer memory, loaded as a client loads it."""
    base = load_base_model(model, num_labels, quantization=quantization)
    footprint = base.model.get_memory_footprint()  # type: ignore[operator]
    del base
    gc.collect()
    return footprint / 2**20


def round_seconds(model: str, quantization: str, clients: int) -> float:
    """The seconds of one round (training, local-model scoring, aggregation)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_in_process(
            ROOT,
            f"quantization-{quantization}",
            num_supernodes=clients,
            output_dir=Path(tmp),
            run_config=f"{RUN_CONFIG} model='{model}' quantization='{quantization}'",
        )
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        return float(read_jsonl(run_dir / "rounds.jsonl")[0]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a causal LM (instruction data)")
    parser.add_argument("--modes", default="none,8bit,4bit")
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"run-config: {RUN_CONFIG} model='{args.model}', {args.clients} clients, in process")
    figures: dict[str, float] = {}
    for mode in args.modes.split(","):
        mib = base_model_mib(args.model, mode, 0)
        seconds = round_seconds(args.model, mode, args.clients)
        print(f"{mode}: base model {mib:.1f} MiB, round {seconds:.1f} s", flush=True)
        figures[f"base_mib_{mode}"], figures[f"round_s_{mode}"] = mib, seconds
    print_figures(**figures)


if __name__ == "__main__":
    main()
