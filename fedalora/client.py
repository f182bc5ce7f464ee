"""One federated client's work, independent of Flower: build its adapter from the
shared state it received and its own private state, train, evaluate, export."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .adapters import ClientAdapter, DecomposedAdapter, LoRAAdapter, export_peft_adapter
from .adapters.wiring import KEPT_PREFIXES
from .aggregation import truncate_rank
from .config import FedConfig, validate_rank
from .data import ClientData, load_client_data, load_official_test, num_labels_of
from .metrics import generation_scores
from .models import BaseModel, cached_base_model, select_device
from .training import evaluate, generate_responses, train_steps

Arrays = dict[str, np.ndarray]
Tensors = dict[str, torch.Tensor]
#: The client's own bookkeeping in its private state (not the adapter's).
CLIENT = "client."
RANK, TAIL_NORM = "client.rank", "client.tail-norm"


class FederatedClient:
    """Client ``partition_id`` of ``num_partitions`` training at LoRA rank ``rank``; with
    ``own_data`` the whole of ``config.dataset`` is this client's (a node's own file)."""

    def __init__(self, config: FedConfig, partition_id: int, num_partitions: int,
                 rank: int, own_data: bool = False) -> None:
        self.config, self.partition_id, self.rank = config, partition_id, rank
        self.device = select_device(config.device, config.bf16)
        self.base: BaseModel = cached_base_model(
            config.model, num_labels_of(config.dataset), config.target_modules,
            config.num_hidden_layers, config.seed)
        self.base.model.to(self.device)  # once per worker: every adapter shares these weights
        validate_rank("lora-rank", rank, self.base.layer_shapes())
        data_partition = (0, 1) if own_data else (partition_id, num_partitions)
        self.data: ClientData = load_client_data(
            config.dataset, config.partitioning, *data_partition,
            config.test_fraction, config.seed, self.base.tokenizer, config.max_length)
        if config.global_test_examples:  # fail before training if there is no such split
            load_official_test(config.dataset, config.global_test_examples, config.seed,
                               self.base.tokenizer, config.max_length)

    def build_adapter(self, shared: Mapping[str, np.ndarray],
                      private: Mapping[str, torch.Tensor] | None,
                      shared_round: int = 0) -> ClientAdapter:
        """Adapter from the shared state (produced in ``shared_round``) and the private
        state (None: fresh A_0).

        Every client draws its initial private factors from the same seed (A_0), as
        the reference code does; with persist-private=false they restart from A_0 each
        round while the head and bookkeeping (``KEPT_PREFIXES``) are kept.
        """
        cfg, private = self.config, dict(private or {})
        rank = self.current_rank(private)
        torch.manual_seed(cfg.seed)
        common = dict(base_model=self.base.model, targets=self.base.targets,
                      head_modules=self.base.head_modules, rank=rank,
                      scale=cfg.scale(rank), dropout=cfg.lora_dropout)
        adapter: ClientAdapter = (
            DecomposedAdapter(**common, intermediate_rank=cfg.intermediate_rank)
            if cfg.sharing.adapter == "decomposed" else
            LoRAAdapter(**common, sharing=cfg.sharing, peft_scaling=cfg.peft_scaling(rank),
                        seed=cfg.seed))
        kept = {k: v for k, v in private.items() if not k.startswith(CLIENT)
                and (cfg.persist_private or k.startswith(KEPT_PREFIXES))}
        if private:
            adapter.load_private(kept, strict=cfg.persist_private)
        adapter.load_shared(shared, shared_round)
        adapter.start_round()
        adapter.model.to(self.device)
        return adapter

    def current_rank(self, private: Mapping[str, torch.Tensor] | None) -> int:
        """The rank this client trains at: its own, or what HetLoRA pruning left of it."""
        if private and RANK in private:
            return int(private[RANK])
        return self.rank

    def train(self, shared: Mapping[str, np.ndarray], private: Mapping[str, torch.Tensor] | None,
              server_round: int, shared_round: int = 0
              ) -> tuple[Arrays, Tensors, dict[str, float]]:
        """One round of local training: (upload, new private state, metrics).

        ``metrics["rank"]`` is the rank of the upload (lower than before if HetLoRA's
        rank self-pruning cut it this round).
        """
        cfg = self.config
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private, shared_round)
        keep = max(1, math.floor(cfg.rank_decay * adapter.rank))
        penalty = None
        if cfg.rank_penalty > 0 and keep < adapter.rank:
            penalty = lambda: cfg.rank_penalty * adapter.tail_norm(keep)  # noqa: E731
        seed = round_seed(cfg.seed, server_round, self.partition_id)
        torch.manual_seed(seed)  # dropout
        metrics = train_steps(adapter.model, adapter.trainable_parameters(), self.data.train,
                              self.base.tokenizer, steps=cfg.local_steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, device=self.device,
                              generator=torch.Generator().manual_seed(seed), penalty=penalty,
                              bf16=cfg.bf16)
        upload, new_private = adapter.shared_state(), adapter.private_state()
        rank = adapter.rank
        if cfg.rank_decay < 1.0:
            if keep < rank:
                upload, rank = self._self_prune(adapter, private, upload, keep, new_private)
            new_private[RANK] = torch.tensor(rank)
        metrics.update(num_examples=self.data.num_train, rank=rank,
                       seconds=time.perf_counter() - started)
        return upload, new_private, metrics

    @staticmethod
    def _self_prune(adapter: ClientAdapter, private: Mapping[str, torch.Tensor] | None,
                    upload: Arrays, keep: int, new_private: Tensors) -> tuple[Arrays, int]:
        """HetLoRA rank self-pruning: cut the rank to ``keep`` when the norm of the
        components beyond ``keep`` fell since the last round (the tail is fading)."""
        with torch.no_grad():
            tail = float(adapter.tail_norm(keep))
        previous = private.get(TAIL_NORM) if private else None
        if previous is not None and tail < float(previous):
            return truncate_rank(upload, keep), keep  # new rank: no tail to compare yet
        new_private[TAIL_NORM] = torch.tensor(tail)
        return upload, adapter.rank

    def evaluate(self, shared: Mapping[str, np.ndarray],
                 private: Mapping[str, torch.Tensor] | None,
                 shared_round: int = 0, final: bool = False) -> tuple[dict[str, float], Tensors]:
        """Score the personalised model (shared state + own private state); returns the
        metrics and the private state (FLoRA merges on receipt)."""
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private, shared_round)
        metrics = self.evaluate_adapter(adapter, final)
        metrics.update(num_examples=self.data.num_test, seconds=time.perf_counter() - started)
        new_private = adapter.private_state()
        new_private.update({k: v for k, v in (private or {}).items() if k.startswith(CLIENT)})
        return metrics, new_private

    def evaluate_adapter(self, adapter: ClientAdapter, final: bool = False) -> dict[str, float]:
        """Metrics on the own test split (instruction data: also ``rouge1`` and
        ``exact_match`` of greedy answers) and, in the ``final`` round with
        ``global-test-examples`` > 0, ``global_accuracy`` on the official test split."""
        cfg = self.config
        metrics = evaluate(adapter.model, self.data.test, self.base.tokenizer,
                           batch_size=cfg.batch_size, device=self.device, bf16=cfg.bf16)
        if self.data.is_instruction:
            responses = generate_responses(
                adapter.model, self.data.test["prompt_ids"], self.base.tokenizer,
                batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                device=self.device, bf16=cfg.bf16)
            metrics.update(generation_scores(responses, self.data.test["references"]))
        if final and cfg.global_test_examples:
            official = load_official_test(cfg.dataset, cfg.global_test_examples, cfg.seed,
                                          self.base.tokenizer, cfg.max_length)
            metrics["global_accuracy"] = evaluate(
                adapter.model, official, self.base.tokenizer, batch_size=cfg.batch_size,
                device=self.device, bf16=cfg.bf16)["accuracy"]
        return metrics

    def export(self, shared: Mapping[str, np.ndarray], private: Mapping[str, torch.Tensor] | None,
               path: str | Path, shared_round: int = 0) -> Path:
        """Write the personalised adapter as a standard PEFT LoRA adapter."""
        adapter = self.build_adapter(shared, private, shared_round)
        return export_peft_adapter(adapter, self.base.model, path)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's batch order and dropout in one round."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])
