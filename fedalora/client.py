"""One federated client's work, independent of Flower: build its adapter from the
shared state it received and its own private state, train, evaluate, export."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .adapters import ClientAdapter, DecomposedAdapter, LoRAAdapter, export_peft_adapter
from .config import FedConfig, validate_rank
from .data import ClientData, load_client_data, num_labels_of
from .models import BaseModel, cached_base_model, select_device
from .training import evaluate, train_steps

Arrays = dict[str, np.ndarray]
Tensors = dict[str, torch.Tensor]


class FederatedClient:
    """Client ``partition_id`` of ``num_partitions`` training at LoRA rank ``rank``."""

    def __init__(self, config: FedConfig, partition_id: int, num_partitions: int,
                 rank: int) -> None:
        self.config, self.partition_id, self.rank = config, partition_id, rank
        self.device = select_device(config.device)
        self.base: BaseModel = cached_base_model(
            config.model, num_labels_of(config.dataset), config.target_modules,
            config.num_hidden_layers, config.seed)
        validate_rank("lora-rank", rank, self.base.layer_shapes())
        self.data: ClientData = load_client_data(
            config.dataset, config.partitioning, partition_id, num_partitions,
            config.test_fraction, config.seed, self.base.tokenizer, config.max_length)

    def build_adapter(self, shared: Mapping[str, np.ndarray],
                      private: Mapping[str, torch.Tensor] | None) -> ClientAdapter:
        """Adapter from the shared state and the private state (None: fresh A_0).

        Every client draws its initial private factors from the same seed (A_0), as
        the reference code does; with persist-private=false they restart from A_0 each
        round while the private head is kept.
        """
        cfg = self.config
        torch.manual_seed(cfg.seed)
        common = dict(base_model=self.base.model, targets=self.base.targets,
                      head_modules=self.base.head_modules, rank=self.rank,
                      scale=cfg.scale(self.rank), dropout=cfg.lora_dropout)
        adapter: ClientAdapter = (
            DecomposedAdapter(**common, intermediate_rank=cfg.intermediate_rank)
            if cfg.adapter == "decomposed" else LoRAAdapter(**common))
        if private is not None:
            kept = private if cfg.persist_private else {
                k: v for k, v in private.items() if k.startswith("head.")}
            adapter.load_private(kept, strict=cfg.persist_private)
        adapter.load_shared(shared)
        adapter.start_round()
        adapter.model.to(self.device)
        return adapter

    def train(self, shared: Mapping[str, np.ndarray], private: Mapping[str, torch.Tensor] | None,
              server_round: int) -> tuple[Arrays, Tensors, dict[str, float]]:
        """One round of local training: (upload, new private state, metrics)."""
        cfg = self.config
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private)
        seed = _round_seed(cfg.seed, server_round, self.partition_id)
        torch.manual_seed(seed)  # dropout
        metrics = train_steps(adapter.model, adapter.trainable_parameters(), self.data.train,
                              self.base.tokenizer, steps=cfg.local_steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, device=self.device,
                              generator=torch.Generator().manual_seed(seed))
        metrics.update(num_examples=self.data.num_train, seconds=time.perf_counter() - started)
        return adapter.shared_state(), adapter.private_state(), metrics

    def evaluate(self, shared: Mapping[str, np.ndarray],
                 private: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """Score the personalised model (shared state + own private state) on own test data."""
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private)
        metrics = evaluate(adapter.model, self.data.test, self.base.tokenizer,
                           batch_size=self.config.batch_size, device=self.device)
        metrics.update(num_examples=self.data.num_test, seconds=time.perf_counter() - started)
        return metrics

    def export(self, shared: Mapping[str, np.ndarray], private: Mapping[str, torch.Tensor] | None,
               path: str | Path) -> Path:
        """Write the personalised adapter as a standard PEFT LoRA adapter."""
        adapter = self.build_adapter(shared, private)
        adapter.model.to("cpu")
        return export_peft_adapter(adapter, self.base.model, path)


def _round_seed(seed: int, server_round: int, partition_id: int) -> int:
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])
