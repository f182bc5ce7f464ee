"""The centralised reference: every client's data pooled in one process and trained as
one multi-task model (one private A per client-task, one shared B), with the same
clients, ranks, data splits and number of steps per client as a federated run: ALoRA,
Fed-ALoRA's counterpart (Ban and Ji, arXiv:2509.25414), or with ``strategy='masa'``
MASA's.

- Equal ranks: PEFT LoRA per client with every client's ``lora_B`` tied to one
  Parameter, DeltaW_k = s B A_k (ALoRA).
- Different ranks: Fed-ALoRA's layer with B0 made one trainable Parameter shared by
  every client and B2 = 0 frozen, DeltaW_k = s B0 M_k A_k (B0 is d_out x d_m).
- MASA (one rank): each client's own expert bank and mixing weights, each layer's B
  tied across clients.

One multi-task model, trained as ALoRA trains: each optimiser step takes one batch from
every client, minimises the mean of their losses and updates every A and the shared B
once, with the clients' local recipe (``FedConfig.recipe``) scheduled over all
``num-server-rounds x local-steps`` steps. After every ``local-steps`` steps (a "round")
each client is scored on its own test split; with no aggregation, that model is both
its local model and its final one, so the rows of both protocols (``local-model``,
``evaluate``) carry the same scores. The run directory has the federated runs' files
(strategy ``centralised``, or ``centralised-masa``; no bytes moved), so
``fedalora.fairness`` reads it like any other run.

    python -m fedalora.centralised --num-clients 8 --run-config "ranks='8'"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .adapters import ClientAdapter
from .client import FederatedClient
from .config import EVERY_ROUND, FedConfig
from .data import collate
from .errors import require
from .methods import pooled_counterpart
from .outputs import PROTOCOLS, RunRecorder, final_figures, protocol_scores
from .run_config import parse_run_config
from .training import batch_indices

STRATEGY = "centralised"


def run_centralised(config: FedConfig, num_clients: int, run_dir: str | Path) -> Path:
    """Train the pooled multi-task reference and write its run directory."""
    started = time.perf_counter()
    recorder = RunRecorder(run_dir)
    recorder.start()
    try:
        last_round = _train(config, num_clients, recorder)
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
        rounds=config.run.num_server_rounds,
        num_clients=num_clients,
        **final_figures(last_round, last_round["metric"]),
    )
    return Path(run_dir)


def _train(config: FedConfig, num_clients: int, recorder: RunRecorder) -> dict[str, Any]:
    """Train and score round by round; returns the last round's row."""
    ranks = [config.run.rank_for(k) for k in range(num_clients)]
    member = counterpart(config, ranks)
    clients = [FederatedClient(member, k, num_clients, ranks[k]) for k in range(num_clients)]
    shapes = clients[0].base.layer_shapes()
    zero = member.method.initial_shared(shapes, ranks)  # B = 0, or B0 = 0
    adapters = [client.build_adapter(zero, None) for client in clients]
    type(adapters[0]).pool_shared_factor(adapters)
    recorder.write_config(
        {
            **config.to_run_config(),
            "strategy": STRATEGY if member is not config else f"{STRATEGY}-{config.strategy}",
            "clients": [
                {"client": c.partition_id, "rank": c.rank, "num_examples": c.data.num_train}
                for c in clients
            ],
            "adapted_layers": {k: list(v) for k, v in shapes.items()},
        }
    )
    parameters = list({id(p): p for a in adapters for p in a.trainable_parameters()}.values())
    total_steps = config.run.num_server_rounds * config.recipe.local_steps
    optimizer, scheduler = config.recipe.optimiser(parameters, total_steps)
    torch.manual_seed(config.run.seed)  # dropout
    batches = [
        batch_indices(
            c.data.num_train,
            config.recipe.batch_size,
            torch.Generator().manual_seed(config.run.seed + c.partition_id),
        )
        for c in clients
    ]
    row: dict[str, Any] = {}
    for server_round in range(1, config.run.num_server_rounds + 1):
        round_started = time.perf_counter()
        for adapter in adapters:
            adapter.model.train()
        for _ in range(config.recipe.local_steps):
            optimizer.zero_grad(set_to_none=True)
            for client, adapter, client_batches in zip(clients, adapters, batches, strict=True):
                batch = collate(
                    client.data.train, next(client_batches), client.base.tokenizer, client.device
                )
                (adapter.model(**batch).loss / num_clients).backward()
            config.recipe.step(parameters, optimizer, scheduler)
        final = server_round == config.run.num_server_rounds
        scored = final or config.run.local_model_scoring == EVERY_ROUND
        scores = [
            _score(c, a, server_round, final)
            for c, a in zip(clients, adapters, strict=True)
            if scored
        ]
        for phase in PROTOCOLS:
            for score in scores:
                recorder.client_row({**score, "phase": phase})
        metric = clients[0].metric
        values = [score[metric] for score in scores]
        row = {
            "round": server_round,
            "metric": metric,
            **{
                k: v
                for phase in PROTOCOLS
                for k, v in protocol_scores(phase, values, metric).items()
            },
            "bytes_up": 0,
            "bytes_down": 0,
            "aggregate_seconds": 0.0,
            "seconds": time.perf_counter() - round_started,
        }
        recorder.round_row(row)
    return row


def counterpart(config: FedConfig, ranks: list[int]) -> FedConfig:
    """The configuration the pooled clients are built with (``pooled_counterpart``)."""
    require(
        not config.dp.enabled,
        "dp-noise-multiplier",
        "the centralised reference pools the data and sends no update to protect; set 0",
    )
    method = pooled_counterpart(type(config.method), ranks)
    return config if method.pooled_reference else config.with_strategy(method.name)


def _score(client: FederatedClient, adapter: ClientAdapter, server_round: int, final: bool) -> dict:
    started = time.perf_counter()
    metrics = client.evaluate_adapter(adapter, final)
    return {
        "round": server_round,
        "client": client.partition_id,
        "rank": client.rank,
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
    config = FedConfig.from_run_config(
        {**overrides, "run-name": args.run_name, "output-dir": args.output_dir}
    )
    run_dir = run_centralised(
        config, args.num_clients, Path(args.output_dir).expanduser().resolve() / args.run_name
    )
    print(f"completed: {run_dir}")


if __name__ == "__main__":
    main()
