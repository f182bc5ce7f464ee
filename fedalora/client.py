"""One federated client's work, independent of Flower: build its adapter from the
shared state it received and its own private state, train, evaluate, export."""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .adapters import ClientAdapter, export_peft_adapter, method_state
from .adapters.adapter import HEAD, STATE
from .cohort import (
    CohortMember,
    CohortModel,
    evaluate_cohort,
    generate_cohort,
    prompts_per_client,
    train_cohort_steps,
)
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


class RoundStart(NamedTuple):
    """A client's round before its local steps: its cohort member (adapter, optimiser,
    batch order, penalty), the shared tensors it installed (for its update), the round,
    the seed of its dropout and the time the round started."""

    member: CohortMember
    installed: Arrays
    server_round: int
    seed: int
    started: float

    @property
    def adapter(self) -> ClientAdapter:
        return self.member.adapter


class FederatedClient:
    """Client ``partition_id`` of ``num_partitions`` training at LoRA rank ``rank``; with
    ``own_data`` the whole of ``config.data.dataset`` is this client's (a node's own file).
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
        self.device = select_device(config.model.device, config.model.bf16)
        drop = config.data.drop_incomplete_rows
        self.base: BaseModel = cached_base_model(
            config.model.name,
            num_labels_of(config.data.dataset, config.data.columns, drop),
            config.lora.target_modules,
            config.model.num_hidden_layers,
            config.run.seed,
            config.model.quantization,
            self.device,  # loaded there once per worker: every adapter shares these weights
            config.model.reinit_head,
            config.model.tokenizer,
            config.model.activation_checkpointing,
        )
        validate_rank("lora-rank", rank, self.base.layer_shapes())
        positions = getattr(self.base.model.config, "max_position_embeddings", None)
        if positions and config.data.max_length > positions:
            raise ConfigError(
                "max-length",
                f"{config.data.max_length} tokens exceed the {positions} positions the model "
                f"'{config.model.name}' can embed; use max-length <= {positions}",
            )
        data_partition = (0, 1) if own_data else (partition_id, num_partitions)
        self.data: ClientData = load_client_data(
            config.data.dataset,
            config.data.partitioning,
            *data_partition,
            config.data.test_fraction,
            config.run.seed,
            self.base.tokenizer,
            config.data.max_length,
            1 if own_data else config.data.clients_per_group,
            config.data.columns,
            drop,
        )
        #: The class names in label-id order (empty for instruction data).
        self.labels = label_names(
            load_labelled_dataset(config.data.dataset, config.data.columns, drop)
        )
        #: The score clients are ranked by: ROUGE-1 of generated answers on instruction
        #: data, accuracy otherwise.
        self.metric = "rouge1" if self.data.is_instruction else ACCURACY
        self._require_known_tokens()
        if config.data.global_test_examples:  # fail before training if there is no such split
            load_official_test(
                config.data.dataset,
                config.data.global_test_examples,
                config.run.seed,
                self.base.tokenizer,
                config.data.max_length,
            )

    def _require_known_tokens(self) -> None:
        """ConfigError when the tokenizer turns most of this client's training text into
        its unknown token: it is not the tokenizer of this model or of this language."""
        share = unknown_token_share(self.base.tokenizer, self.data.train["input_ids"])
        if share > 0.5:
            key = "tokenizer" if self.config.model.tokenizer else "model"
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
        torch.manual_seed(cfg.run.seed)
        adapter = method.make_adapter(self.base, rank, cfg.lora.dropout)
        adapter.server_round = server_round
        if private:
            kept = (
                private
                if cfg.faults.persist_private
                else {k: v for k, v in private.items() if k.startswith((HEAD, STATE))}
            )
            adapter.load_private(kept, method.keeps, strict=cfg.faults.persist_private)
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
        exports = [export_to]
        return train_cohort(
            [self], [shared], [private], server_round, shared_round, final, exports
        )[0]

    def scores_local_model(self, final: bool) -> bool:
        """Whether the local model is scored right after training in this round."""
        return final or self.config.run.local_model_scoring == EVERY_ROUND

    def local_steps(self, start: RoundStart) -> dict[str, float]:
        """The round's local steps of this client alone (dropout seeded for it)."""
        cfg = self.config
        torch.manual_seed(start.seed)
        return train_steps(
            start.adapter.model,
            start.adapter.trainable_parameters(),
            self.data.train,
            self.base.tokenizer,
            steps=cfg.recipe.local_steps,
            batch_size=cfg.recipe.batch_size,
            recipe=cfg.recipe,
            optimiser=start.member.optimiser,
            device=self.device,
            generator=start.member.generator,
            penalty=start.member.penalty,
            bf16=cfg.model.bf16,
        )

    def start_training(
        self,
        shared: Mapping[str, np.ndarray],
        private: Mapping[str, torch.Tensor] | None,
        server_round: int,
        shared_round: int = 0,
    ) -> RoundStart:
        """The adapter of ``server_round`` and what its local training needs (alone or
        in a cohort)."""
        cfg, method = self.config, self.method
        started = time.perf_counter()
        adapter = self.build_adapter(shared, private, shared_round, server_round)
        installed = adapter.arrays(method.downloads) if method.dp_refusal() is None else {}
        seed = round_seed(cfg.run.seed, server_round, self.partition_id)
        member = CohortMember(
            adapter,
            self.data.train,
            adapter.optimiser(cfg.recipe, cfg.recipe.local_steps),
            torch.Generator().manual_seed(seed),
            method.loss_penalty(adapter),
        )
        return RoundStart(member, installed, server_round, seed, started)

    def finish_training(
        self,
        start: RoundStart,
        metrics: dict[str, float],
        export_to: Path | None = None,
    ) -> TrainResult:
        """The upload and private state of a client whose local steps are done (its local
        model not yet scored), exported to ``export_to`` when given."""
        cfg, method, adapter = self.config, self.method, start.adapter
        upload = method.upload(adapter)
        if cfg.dp.enabled:  # send the clipped (and in local mode noised) update instead
            upload = cfg.dp.client_upload(
                method.shared_delta(start.installed, upload),
                cfg.dp.noise_rng(cfg.run.seed, start.server_round, self.partition_id, NOISE_STREAM),
            )
        elif method.dp_refusal() is None:  # what dp-clip would bound (the median: a common C)
            metrics["update_norm"] = global_norm(method.shared_delta(start.installed, upload))
        metrics.update(
            num_examples=self.data.num_train,
            rank=method.client_rank(self.rank, adapter.state),
            seconds=time.perf_counter() - start.started,
        )
        if export_to is not None:
            export_peft_adapter(
                method.export_factors(adapter), adapter, self.base.model, export_to, self.labels
            )
        return TrainResult(upload, adapter.private_state(method.keeps), metrics, {})

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
        return evaluate_cohort_clients(
            [self], [shared], [private], shared_round, final, server_round
        )[0]

    def evaluate_adapter(self, adapter: ClientAdapter, final: bool = False) -> dict[str, float]:
        """Metrics on the own test split (instruction data: also ``rouge1`` and
        ``exact_match`` of greedy answers) and, in the ``final`` round with
        ``global-test-examples`` > 0, ``global_accuracy`` on the official test split."""
        cfg = self.config
        metrics = evaluate(
            adapter.model,
            self.data.test,
            self.base.tokenizer,
            batch_size=cfg.recipe.eval_batch_size,
            device=self.device,
            bf16=cfg.model.bf16,
        )
        if self.data.is_instruction:
            responses = generate_responses(
                adapter.model,
                self.data.test["prompt_ids"],
                self.base.tokenizer,
                batch_size=cfg.recipe.eval_batch_size,
                max_new_tokens=cfg.data.max_new_tokens,
                device=self.device,
                bf16=cfg.model.bf16,
            )
            metrics.update(generation_scores(responses, self.data.test["references"]))
        if final and cfg.data.global_test_examples:
            official = load_official_test(
                cfg.data.dataset,
                cfg.data.global_test_examples,
                cfg.run.seed,
                self.base.tokenizer,
                cfg.data.max_length,
            )
            metrics["global_accuracy"] = evaluate(
                adapter.model,
                official,
                self.base.tokenizer,
                batch_size=cfg.recipe.eval_batch_size,
                device=self.device,
                bf16=cfg.model.bf16,
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


def train_cohort(
    clients: Sequence[FederatedClient],
    shared: Sequence[Mapping[str, np.ndarray]],
    private: Sequence[Mapping[str, torch.Tensor] | None],
    server_round: int,
    shared_round: int = 0,
    final: bool = False,
    export_to: Sequence[Path | None] | None = None,
    cohort_size: int = 0,
) -> list[TrainResult]:
    """``FederatedClient.train`` for clients of one worker (one base model, one run
    configuration; ``shared[k]`` and ``private[k]`` are client k's), ``cohort_size`` at a
    time (0: all): a chunk's adapters are built, their local steps taken together in one
    batched pass per step (``fedalora.cohort``), their local models scored together
    (``score_cohort``), and they are dropped before the next chunk's are built, so that a
    worker holds one chunk's adapters and optimisers at a time. Each client's result is
    the one it gets alone, to float rounding with dropout off (with dropout on, a
    chunk's masks come from one stream seeded by its first client and the round).
    Clients whose adapter cannot be batched (``ClientAdapter.cohort_problem``), and a
    chunk of one, train one after another exactly as ``FederatedClient.train`` trains
    them."""
    if not clients:
        return []
    config, base = _one_worker(clients)
    exports = list(export_to or [None] * len(clients))
    scored = clients[0].scores_local_model(final)
    size = cohort_size or len(clients)
    results: list[TrainResult] = []
    for first in range(0, len(clients), size):
        members, outs = clients[first : first + size], exports[first : first + size]
        starts = [
            client.start_training(shared[first + j], private[first + j], server_round, shared_round)
            for j, client in enumerate(members)
        ]
        alone, batched = _chunks([s.adapter for s in starts], 0)
        own: dict[int, TrainResult] = {}
        for j in alone:  # exactly as FederatedClient.train
            steps = members[j].local_steps(starts[j])
            own[j] = members[j].finish_training(starts[j], steps, outs[j])
        for chunk in batched:
            lead = members[chunk[0]]
            torch.manual_seed(round_seed(config.run.seed, server_round, lead.partition_id))
            metrics = train_cohort_steps(
                cohort_model(base),
                [starts[j].member for j in chunk],
                steps=config.recipe.local_steps,
                batch_size=config.recipe.batch_size,
                recipe=config.recipe,
                device=lead.device,
                bf16=config.model.bf16,
            )
            for j, metric in zip(chunk, metrics, strict=True):
                own[j] = members[j].finish_training(starts[j], metric, outs[j])
        if scored:
            local = score_cohort(members, [s.adapter for s in starts], final, size)
            own = {j: own[j]._replace(local_model=local[j]) for j in own}
        results += [own[j] for j in range(len(members))]
    return results


def evaluate_cohort_clients(
    clients: Sequence[FederatedClient],
    shared: Sequence[Mapping[str, np.ndarray]],
    private: Sequence[Mapping[str, torch.Tensor] | None],
    shared_round: int = 0,
    final: bool = False,
    server_round: int = 0,
    cohort_size: int = 0,
) -> list[tuple[dict[str, float], Tensors]]:
    """``FederatedClient.evaluate`` for clients of one worker, ``cohort_size`` at a time
    (0: all): a chunk's adapters are built, scored together (``score_cohort``) and
    dropped before the next chunk's are built."""
    if not clients:
        return []
    size = cohort_size or len(clients)
    results: list[tuple[dict[str, float], Tensors]] = []
    for first in range(0, len(clients), size):
        group = clients[first : first + size]
        started = time.perf_counter()
        adapters = [
            client.build_adapter(shared[first + j], private[first + j], shared_round, server_round)
            for j, client in enumerate(group)
        ]
        built = (time.perf_counter() - started) / len(group)
        scores = score_cohort(group, adapters, final, size)
        for score in scores:
            score["seconds"] += built
        results += [
            (score, adapter.private_state(client.method.keeps))
            for client, adapter, score in zip(group, adapters, scores, strict=True)
        ]
    return results


def score_cohort(
    clients: Sequence[FederatedClient],
    adapters: Sequence[ClientAdapter],
    final: bool = False,
    cohort_size: int = 0,
) -> list[dict[str, float]]:
    """``FederatedClient.evaluate_adapter`` of every client's adapter (with its
    ``num_examples`` and ``seconds``), ``cohort_size`` clients at a time (0: all) in one
    batched pass over each evaluation batch, and for instruction data in one greedy
    generation (``fedalora.cohort.evaluate_cohort``, ``generate_cohort``); a client's
    ``seconds`` is its share of its chunk's time. Clients that cannot be batched, and a
    chunk of one, are scored alone."""
    config, base = _one_worker(clients)
    scores: dict[int, dict[str, float]] = {}
    alone, chunks = _chunks(adapters, cohort_size)
    for k in alone:
        started = time.perf_counter()
        scores[k] = clients[k].evaluate_adapter(adapters[k], final)
        scores[k]["seconds"] = time.perf_counter() - started
    batch_size, device, bf16 = config.recipe.eval_batch_size, clients[0].device, config.model.bf16
    for chunk in chunks:
        started = time.perf_counter()
        cohort, own = cohort_model(base), [adapters[k] for k in chunk]
        metrics = evaluate_cohort(
            cohort,
            own,
            [clients[k].data.test for k in chunk],
            batch_size=batch_size,
            device=device,
            bf16=bf16,
        )
        if clients[0].data.is_instruction:
            answers = generate_cohort(
                cohort,
                own,
                [clients[k].data.test["prompt_ids"] for k in chunk],
                batch_size=prompts_per_client(batch_size, config.recipe.batch_size, len(chunk)),
                max_new_tokens=config.data.max_new_tokens,
                device=device,
                bf16=bf16,
            )
            for k, own_metrics, own_answers in zip(chunk, metrics, answers, strict=True):
                own_metrics.update(
                    generation_scores(own_answers, clients[k].data.test["references"])
                )
        if final and config.data.global_test_examples:
            official = load_official_test(
                config.data.dataset,
                config.data.global_test_examples,
                config.run.seed,
                base.tokenizer,
                config.data.max_length,
            )
            on_official = evaluate_cohort(
                cohort,
                own,
                [official] * len(chunk),
                batch_size=batch_size,
                device=device,
                bf16=bf16,
            )
            for own_metrics, score in zip(metrics, on_official, strict=True):
                own_metrics["global_accuracy"] = score["accuracy"]
        share = (time.perf_counter() - started) / len(chunk)
        for k, own_metrics in zip(chunk, metrics, strict=True):
            scores[k] = {**own_metrics, "seconds": share}
    for k, client in enumerate(clients):
        scores[k]["num_examples"] = client.data.num_test
    return [scores[k] for k in range(len(clients))]


def _one_worker(clients: Sequence[FederatedClient]) -> tuple[FedConfig, BaseModel]:
    """The one run configuration and base model of a cohort's clients."""
    config, base = clients[0].config, clients[0].base
    if any(c.base is not base or c.config != config for c in clients):
        raise ValueError("a cohort's clients share one base model and one run configuration")
    return config, base


def _chunks(
    adapters: Sequence[ClientAdapter], cohort_size: int
) -> tuple[list[int], list[list[int]]]:
    """The clients (indices) that go alone (their adapter cannot be batched, or their
    chunk would be of one), and the chunks of at most ``cohort_size`` (0: all) that go
    through a batched pass together."""
    batched = [k for k, a in enumerate(adapters) if a.cohort_problem() is None]
    size = cohort_size or len(batched) or 1
    chunks = [batched[first : first + size] for first in range(0, len(batched), size)]
    alone = set(range(len(adapters))) - set(batched) | {c[0] for c in chunks if len(c) == 1}
    return sorted(alone), [c for c in chunks if len(c) > 1]


_COHORT_MODELS: weakref.WeakKeyDictionary[nn.Module, CohortModel] = weakref.WeakKeyDictionary()


def cohort_model(base: BaseModel) -> CohortModel:
    """The worker's one cohort model over ``base`` (built on first use; it holds the base's
    frozen tensors but not the base model, so it goes when the base does)."""
    if base.model not in _COHORT_MODELS:
        _COHORT_MODELS[base.model] = CohortModel(base)
    return _COHORT_MODELS[base.model]


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's batch order and dropout in one round."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])
