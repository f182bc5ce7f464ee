"""Training tokens per second in the client against a bare PEFT training loop.

The client's whole round (``FederatedClient.train``: adapter built on the shared base
weights, private and shared state loaded, the AdamW steps, the upload and private
state read back) against a bare loop on a copy of the same base model
(``get_peft_model`` + AdamW + the steps), on the same batches: the default
configuration's first client (MiniLM, BBC News, rank 64, batch 16, 64 tokens), with
``--steps`` steps. Tokens are the non-padding tokens of those batches. Runs for the
default strategy (``fedalora-hetero``: Fed-ALoRA's decomposed layer) and for
``fedalora`` (PEFT's LoRA layer in the client); ``throughput_ratio`` is the default
strategy's. Timings alternate between the loops; the median of ``--repeats`` is kept.

    python benchmarks/throughput.py [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from common import federation, machine, print_figures
from peft import LoraConfig, get_peft_model

from fedalora.client import FederatedClient, round_seed
from fedalora.config import FedConfig
from fedalora.run_config import parse_run_config
from fedalora.training import autocast, batch_indices

PARTITION, NUM_CLIENTS, SERVER_ROUND = 0, 8, 1


def setup(
    strategy: str, steps: int, overrides: str
) -> tuple[FederatedClient, dict[str, np.ndarray]]:
    """The default configuration's first client (with ``overrides``) and the method's
    initial shared state."""
    config = FedConfig.from_run_config(
        {
            **parse_run_config(overrides),
            "strategy": strategy,
            "ranks": "64",
            "local-steps": steps,
        }
    )
    client = FederatedClient(config, PARTITION, NUM_CLIENTS, config.run.rank_for(PARTITION))
    return client, federation([client])[1]


def client_batches(client: FederatedClient) -> list[list[int]]:
    """The example indices the client trains on in ``SERVER_ROUND``."""
    generator = torch.Generator().manual_seed(
        round_seed(client.config.run.seed, SERVER_ROUND, client.partition_id)
    )
    batches = batch_indices(client.data.num_train, client.config.recipe.batch_size, generator)
    return [next(batches) for _ in range(client.config.recipe.local_steps)]


def count_tokens(client: FederatedClient, batches: list[list[int]]) -> int:
    ids = client.data.train["input_ids"]
    return sum(len(ids[i]) for batch in batches for i in batch)


def synchronised_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_client(client: FederatedClient, shared: dict[str, np.ndarray]) -> float:
    started = synchronised_clock(client.device)
    client.train(shared, None, SERVER_ROUND)
    return synchronised_clock(client.device) - started


def time_bare_peft(client: FederatedClient, batches: list[list[int]]) -> float:
    """get_peft_model on a fresh copy of the base model, then plain AdamW steps."""
    cfg, base, tokenizer = client.config, client.base, client.base.tokenizer
    model = copy.deepcopy(base.model)
    examples = client.data.train
    started = synchronised_clock(client.device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=client.rank,
            lora_alpha=cfg.lora.scaling.alpha * client.rank,  # type: ignore[arg-type]  # a float is fine
            lora_dropout=cfg.lora.dropout,
            target_modules=base.targets,
            modules_to_save=base.head_modules or None,
        ),
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.recipe.lr
    )
    model.train()
    for indices in batches:
        batch = tokenizer.pad(
            {"input_ids": [examples["input_ids"][i] for i in indices]}, return_tensors="pt"
        )
        batch["labels"] = torch.tensor([examples["labels"][i] for i in indices])
        with autocast(client.device, cfg.model.bf16):
            loss = model(**{k: v.to(client.device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return synchronised_clock(client.device) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--run-config", default="", help="overrides, e.g. \"model='./minilm' device='cuda'\""
    )
    args = parser.parse_args()
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    ratios: dict[str, float] = {}
    for strategy in ("fedalora-hetero", "fedalora"):
        client, shared = setup(strategy, args.steps, args.run_config)
        batches = client_batches(client)
        tokens = count_tokens(client, batches)
        time_client(client, shared)  # warm-up: allocator, kernels
        time_bare_peft(client, batches)
        ours, bare = [], []
        for _ in range(args.repeats):
            ours.append(time_client(client, shared))
            bare.append(time_bare_peft(client, batches))
        ours_tps, bare_tps = tokens / statistics.median(ours), tokens / statistics.median(bare)
        ratios[strategy] = ours_tps / bare_tps
        print(
            f"{strategy}: {tokens} tokens in {args.steps} steps | client "
            f"{ours_tps:.0f} tokens/s (median of {[round(s, 2) for s in ours]} s) | bare "
            f"PEFT {bare_tps:.0f} tokens/s (median of {[round(s, 2) for s in bare]} s) | "
            f"ratio {ratios[strategy]:.3f}"
        )
    print_figures(
        throughput_ratio=ratios["fedalora-hetero"],
        throughput_ratio_peft_lora_client=ratios["fedalora"],
    )


if __name__ == "__main__":
    main()
