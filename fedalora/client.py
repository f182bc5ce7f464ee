"""One federated client's work, independent of Flower: build its adapter from the
shared state it received and its own private state, train, evaluate, export."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .adapters import ClientAdapter, export_peft_adapter, method_state
from .adapters.adapter import HEAD, STATE
from .config import EVERY_ROUND, FedConfig, validate_rank
from .data import (
    ClientData,
    label_names,
    load_client_data,
    load_labelled_dataset,
    load_official_test,
    num_labels_of,
)
from .errors import ConfigError
from .metrics import generation_scores
from .models import BaseModel, cached_base_model, select_device, unknown_token_share
from .privacy import NOISE_STREAM, global_norm
from .training import evaluate, generate_responses, train_steps
from .types import Arrays, Tensors

ACCURACY = "accuracy"


class TrainResult(NamedTuple):
    """A client's round: what it uploads, the private state it keeps, its training
    metrics, and the scores of its local model right after training."""

    upload: Arrays
    private: Tensors
    metrics: dict[str, float]
    local_model: dict[str, float]


class FederatedClient:
    """Client ``partition_id`` of ``num_partitions`` training at LoRA rank ``rank``; with
    ``own_data`` the whole of ``config.dataset`` is this client's (a node's own file).
    What it shares, keeps and does at each step of a round is its method's
    (``config.method``, ``fedalora.methods.base``)."""

    def __init__(
        self,
        config: FedConfig,
        partition_id: int,
        num_partitions: int,
        rank: int,
        own_data: bool = False,
    ) -> None:
        self.config, self.partition_id, self.rank = config, partition_id, rank
        self.method = config.method
        self.device = select_device(config.device, config.bf16)
        drop = config.drop_incomplete_rows
        self.base: BaseModel = cached_base_model(
            config.model,
            num_labels_of(config.dataset, config.columns, drop),
            config.target_modules,
            config.num_hidden_layers,
            config.seed,
            config.quantization,
            self.device,  # loaded there once per worker: every adapter shares these weights
            config.reinit_head,
            config.tokenizer,
        )
        validate_rank("lora-rank", rank, self.base.layer_shapes())
        positions = getattr(self.base.model.config, "max_position_embeddings", None)
        if positions and config.max_length > positions:
            raise ConfigError(
                "max-length",
                f"{config.max_length} tokens exceed the {positions} positions the model "
                f"'{config.model}' can embed; use max-length <= {positions}",
            )
        data_partition = (0, 1) if own_data else (partition_id, num_partitions)
        self.data: ClientData = load_client_data(
            config.dataset,
            config.partitioning,
            *data_partition,
            config.test_fraction,
            config.seed,
            self.base.tokenizer,
            config.max_length,
            1 if own_data else config.clients_per_group,
            config.columns,
            drop,
        )
        #: The class names in label-id order (empty for instruction data).
        self.labels = label_names(load_labelled_dataset(config.dataset, config.columns, drop))
        #: The score clients are ranked by: ROUGE-1 of generated answers on instruction
        #: data, accuracy otherwise.
        self.metric = "rouge1" if self.data.is_instruction else ACCURACY
        self._require_known_tokens()
        if config.global_test_examples:  # fail before training if there is no such split
            load_official_test(
                config.dataset,
                config.global_test_examples,
                config.seed,
                self.base.tokenizer,
                config.max_length,
            )

    def _require_known_tokens(self) -> None:
        """ConfigError when the tokenizer turns most of this client's training text into
        its unknown token: it is not the tokenizer of this model or of this language."""
        share = unknown_token_share(self.base.tokenizer, self.data.train["input_ids"])
        if share > 0.5:
            key = "tokenizer" if self.config.tokenizer else "model"
            raise ConfigError(
                key,
                f"the tokenizer turns {share:.0%} of client {self.partition_id}'s tokens into "
                f"{self.base.tokenizer.unk_token!r}, so the model would train on noise; give "
                "the tokenizer the model was trained with (saved beside it, or tokenizer=)",
            )

    def build_adapter(
        self,
        shared: Mapping[str, np.ndarray],
        private: Mapping[str, torch.Tensor] | None,
        shared_round: int = 0,
        server_round: int = 0,
    ) -> ClientAdapter:
        """Adapter for ``server_round`` from the shared state (produced in
        ``shared_round``) and the private state (None: fresh A_0).

        Every client draws its initial private factors from the same seed (A_0), as
        the reference code does; with persist-private=false they restart from A_0 each
        round while the head and the method's bookkeeping are kept.
        """
        cfg, method = self.config, self.method
        private = dict(private or {})
        rank = method.client_rank(self.rank, method_state(private))
        torch.manual_seed(cfg.seed)
        adapter = method.make_adapter(self.base, rank, cfg.lora_dropout)
        adapter.server_round = server_round
        if private:
            kept = (
                private
                if cfg.persist_private
                else {k: v for k, v in private.items() if k.startswith((HEAD, STATE))}
            )
            adapter.load_private(kept, method.keeps, strict=cfg.persist_private)
        method.install(adapter, shared, shared_round)
        method.start_round(adapter)
        adapter.model.to(self.device)
        return adapter

    def train(
        self,
        shared: Mapping[str, np.ndarray],
        private: Mapping[str, torch.Tensor] | None,
        server_round: int,
        shared_round: int = 0,
        final: bool = False,
        export_to: Path | None = None,
    ) -> TrainResult:
        """One round of local training, and the score of the trained local model (the
        paper's protocol: every round, or with ``local-model-scoring=final-round`` only in
        the ``final`` one, where it is also scored on the official test split), which is
        exported as a PEFT adapter to ``export_to`` when given.

        ``metrics["rank"]`` is the rank of the upload (lower than before if the method
        cut it this round, as HetLoRA's rank self-pruning does). Under client-level DP
        the upload is the clipped update (``fedalora.privacy``); without it, a method
        that DP could protect reports the update's L2 norm as ``update_norm``.
        """
        cfg, method = self.config, self.method
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private, shared_round, server_round)
        linear = method.dp_refusal() is None
        installed = adapter.arrays(method.downloads) if linear else {}
        seed = round_seed(cfg.seed, server_round, self.partition_id)
        torch.manual_seed(seed)  # dropout
        metrics = train_steps(
            adapter.model,
            adapter.trainable_parameters(),
            self.data.train,
            self.base.tokenizer,
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            recipe=cfg.recipe,
            optimiser=adapter.optimiser(cfg.recipe, cfg.local_steps),
            device=self.device,
            generator=torch.Generator().manual_seed(seed),
            penalty=method.loss_penalty(adapter),
            bf16=cfg.bf16,
        )
        upload = method.after_training(adapter, method.upload(adapter))
        if cfg.dp.enabled:  # send the clipped (and in local mode noised) update instead
            upload = cfg.dp.client_upload(
                method.shared_delta(installed, upload),
                cfg.dp.noise_rng(cfg.seed, server_round, self.partition_id, NOISE_STREAM),
            )
        elif linear:  # what dp-clip would bound: the median is a common choice of C
            metrics["update_norm"] = global_norm(method.shared_delta(installed, upload))
        metrics.update(
            num_examples=self.data.num_train,
            rank=method.client_rank(self.rank, adapter.state),
            seconds=time.perf_counter() - started,
        )
        private_state = adapter.private_state(method.keeps)
        local_model: dict[str, float] = {}
        if final or cfg.local_model_scoring == EVERY_ROUND:
            started = time.perf_counter()
            local_model = self.evaluate_adapter(adapter, final)
            local_model.update(
                num_examples=self.data.num_test, seconds=time.perf_counter() - started
            )
        if export_to is not None:
            export_peft_adapter(
                method.export_factors(adapter), adapter, self.base.model, export_to, self.labels
            )
        return TrainResult(upload, private_state, metrics, local_model)

    def evaluate(
        self,
        shared: Mapping[str, np.ndarray],
        private: Mapping[str, torch.Tensor] | None,
        shared_round: int = 0,
        final: bool = False,
        server_round: int = 0,
    ) -> tuple[dict[str, float], Tensors]:
        """Score the personalised model (shared state + own private state) in
        ``server_round``; returns the metrics and the private state (a method may update
        it on receipt, as FLoRA merges)."""
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private, shared_round, server_round)
        metrics = self.evaluate_adapter(adapter, final)
        metrics.update(num_examples=self.data.num_test, seconds=time.perf_counter() - started)
        return metrics, adapter.private_state(self.method.keeps)

    def evaluate_adapter(self, adapter: ClientAdapter, final: bool = False) -> dict[str, float]:
        """Metrics on the own test split (instruction data: also ``rouge1`` and
        ``exact_match`` of greedy answers) and, in the ``final`` round with
        ``global-test-examples`` > 0, ``global_accuracy`` on the official test split."""
        cfg = self.config
        metrics = evaluate(
            adapter.model,
            self.data.test,
            self.base.tokenizer,
            batch_size=cfg.eval_batch_size,
            device=self.device,
            bf16=cfg.bf16,
        )
        if self.data.is_instruction:
            responses = generate_responses(
                adapter.model,
                self.data.test["prompt_ids"],
                self.base.tokenizer,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
                device=self.device,
                bf16=cfg.bf16,
            )
            metrics.update(generation_scores(responses, self.data.test["references"]))
        if final and cfg.global_test_examples:
            official = load_official_test(
                cfg.dataset, cfg.global_test_examples, cfg.seed, self.base.tokenizer, cfg.max_length
            )
            metrics["global_accuracy"] = evaluate(
                adapter.model,
                official,
                self.base.tokenizer,
                batch_size=cfg.eval_batch_size,
                device=self.device,
                bf16=cfg.bf16,
            )["accuracy"]
        return metrics

    def export(
        self,
        shared: Mapping[str, np.ndarray],
        private: Mapping[str, torch.Tensor] | None,
        path: str | Path,
        shared_round: int = 0,
        server_round: int = 0,
    ) -> Path:
        """Write the personalised adapter as a standard PEFT LoRA adapter."""
        adapter = self.build_adapter(shared, private, shared_round, server_round)
        return export_peft_adapter(
            self.method.export_factors(adapter), adapter, self.base.model, path, self.labels
        )


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's batch order and dropout in one round."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])
