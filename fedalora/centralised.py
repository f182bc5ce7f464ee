"""The centralised reference: every client's data pooled in one process and trained as
ALoRA multi-task (one private A per client-task, one shared B), with the same clients,
ranks, data splits and number of steps per client as a federated run.

- Equal ranks: PEFT LoRA per client with every client's ``lora_B`` tied to one
  Parameter, DeltaW_k = s B A_k (ALoRA).
- Different ranks: Fed-ALoRA's layer with B0 made one trainable Parameter shared by
  every client and B2 = 0 frozen, DeltaW_k = s B0 M_k A_k (B0 is d_out x d_m).

Each step takes one batch from every client in a seeded random order; after every
``local-steps`` steps (a "round") each client is scored on its own test split. The run
directory has the federated runs' files (strategy ``centralised``, no bytes moved), so
``fedalora.fairness`` reads it like any other run.

    python -m fedalora.centralised --num-clients 8 --run-config "ranks='8'"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import ClientAdapter, DecomposedAdapter, LoRAAdapter
from .client import FederatedClient
from .config import FedConfig, parse_run_config
from .data import collate
from .methods.fedalora import FedALoRA
from .methods.fedalora_hetero import FedALoRAHetero
from .outputs import RunRecorder
from .training import batch_indices

STRATEGY = "centralised"


def run_centralised(config: FedConfig, num_clients: int, run_dir: str | Path) -> Path:
    """Train the pooled multi-task reference and write its run directory."""
    started = time.perf_counter()
    recorder = RunRecorder(run_dir)
    recorder.start()
    try:
        rows = _train(config, num_clients, recorder)
    except BaseException as exc:
        recorder.finish(
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            wall_seconds=time.perf_counter() - started,
        )
        raise
    recorder.finish(
        "completed",
        wall_seconds=time.perf_counter() - started,
        rounds=config.num_server_rounds,
        num_clients=num_clients,
        final_mean_accuracy=float(np.mean([r["accuracy"] for r in rows])),
        final_worst_accuracy=float(np.min([r["accuracy"] for r in rows])),
    )
    return Path(run_dir)


def _train(config: FedConfig, num_clients: int, recorder: RunRecorder) -> list[dict]:
    ranks = [config.rank_for(k) for k in range(num_clients)]
    homogeneous = len(set(ranks)) == 1
    member = config.with_strategy(FedALoRA.name if homogeneous else FedALoRAHetero.name)
    clients = [FederatedClient(member, k, num_clients, ranks[k]) for k in range(num_clients)]
    shapes = clients[0].base.layer_shapes()
    zero = member.method.initial_shared(shapes, ranks)  # B = 0, or B0 = 0
    adapters = [client.build_adapter(zero, None) for client in clients]
    _share_b(adapters, homogeneous)
    recorder.write_config(
        {
            **config.to_run_config(),
            "strategy": STRATEGY,
            "clients": [
                {"client": c.partition_id, "rank": c.rank, "num_examples": c.data.num_train}
                for c in clients
            ],
            "adapted_layers": {k: list(v) for k, v in shapes.items()},
        }
    )
    parameters = list({id(p): p for a in adapters for p in a.trainable_parameters()}.values())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    torch.manual_seed(config.seed)  # dropout
    order = torch.Generator().manual_seed(config.seed)
    batches = [
        batch_indices(
            c.data.num_train,
            config.batch_size,
            torch.Generator().manual_seed(config.seed + c.partition_id),
        )
        for c in clients
    ]
    rows: list[dict] = []
    for server_round in range(1, config.num_server_rounds + 1):
        round_started = time.perf_counter()
        for adapter in adapters:
            adapter.model.train()
        for _ in range(config.local_steps):
            for k in torch.randperm(num_clients, generator=order).tolist():
                batch = collate(
                    clients[k].data.train,
                    next(batches[k]),
                    clients[k].base.tokenizer,
                    clients[k].device,
                )
                loss = adapters[k].model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        rows = [
            _score(client, adapter, server_round, final=server_round == config.num_server_rounds)
            for client, adapter in zip(clients, adapters, strict=True)
        ]
        for row in rows:
            recorder.client_row(row)
        scores = [row["accuracy"] for row in rows]
        recorder.round_row(
            {
                "round": server_round,
                "mean_accuracy": float(np.mean(scores)),
                "worst_accuracy": float(np.min(scores)),
                "num_evaluated": len(rows),
                "bytes_up": 0,
                "bytes_down": 0,
                "aggregate_seconds": 0.0,
                "seconds": time.perf_counter() - round_started,
            }
        )
    return rows


def _share_b(adapters: list[ClientAdapter], homogeneous: bool) -> None:
    """Make every client's up-projection one shared trainable Parameter per layer."""
    for module in adapters[0].targets:
        if homogeneous:
            lora_b = [
                a.layer(module).lora_B["default"] for a in adapters if isinstance(a, LoRAAdapter)
            ]
            for layer in lora_b[1:]:
                layer.weight = lora_b[0].weight
            continue
        layers = [a.layer(module) for a in adapters if isinstance(a, DecomposedAdapter)]
        shared = nn.Parameter(layers[0].B0.detach().clone())
        for layer in layers:
            layer.B0 = shared  # the frozen buffer becomes the shared, trained B
            layer.B2.requires_grad_(False)  # B2 = 0: DeltaW = s B0 M A
            layer.B1.requires_grad_(False)


def _score(client: FederatedClient, adapter: ClientAdapter, server_round: int, final: bool) -> dict:
    started = time.perf_counter()
    metrics = client.evaluate_adapter(adapter, final)
    return {
        "round": server_round,
        "client": client.partition_id,
        "rank": client.rank,
        "phase": "evaluate",
        "num_examples": client.data.num_test,
        **metrics,
        "bytes_up": 0,
        "bytes_down": 0,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clients", type=int, default=8)
    parser.add_argument("--run-config", default="", help="e.g. \"ranks='8' lr=0.002\"")
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--run-name", default=time.strftime("centralised-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    overrides = parse_run_config(args.run_config)
    overrides.pop("strategy", None)  # the ranks decide the adapter
    config = FedConfig.from_run_config(
        {**overrides, "run-name": args.run_name, "output-dir": args.output_dir}
    )
    run_dir = run_centralised(
        config, args.num_clients, Path(args.output_dir).expanduser().resolve() / args.run_name
    )
    print(f"completed: {run_dir}")


if __name__ == "__main__":
    main()
