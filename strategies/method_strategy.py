"""One Flower strategy for every federated method: per-node messages around the
method's pure aggregation rule (``fedalora.methods``).

It honours Flower's ``Strategy`` contract: ``configure_train`` / ``configure_evaluate``
turn the current global ``arrays`` into one message per sampled node (the method's
per-node ``download``), ``aggregate_train`` returns the new global arrays (None when
too few updates were accepted) and ``aggregate_evaluate`` the clients' mean and worst
score, so ``Strategy.start`` can drive it; ``round_loop.run_rounds`` adds resuming and
retries. Hand it its nodes with ``connect`` (after discovery) and, to resume, the
checkpoint with ``restore``. Its collaborators: ``RoundTally`` (traffic and timing),
``ReplyScreen`` (which uploads may enter) and ``records`` (the run's rows).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedalora.checkpoint import Checkpoint
from fedalora.config import FedConfig, heterogeneous_methods, validate_rank
from fedalora.errors import ConfigError, RunFailed
from fedalora.outputs import EVALUATE, LOCAL_MODEL, TRAIN, RunRecorder
from fedalora.privacy import leading_block
from fedalora.robust import MEDIAN, TRIMMED_MEAN, claim_weights, outlying_claims, robust_step
from fedalora.types import Arrays, LayerShapes, module_of

from .accounting import RoundTally
from .discovery import Node
from .protocol import (
    ACCURACY,
    ARRAYS,
    CONFIG,
    FINAL_ROUND,
    LOSS,
    METRICS,
    NUM_EXAMPLES,
    REPLY_METRICS,
    SERVER_ROUND,
    SHARED_ROUND,
    destinations,
    number,
    reply_sender,
    to_numpy,
    to_record,
)
from .records import client_rows, log_round, round_row
from .screening import ReplyScreen


class MethodStrategy(Strategy):
    """The federated method of ``config`` on the adapted layers ``layer_shapes``."""

    def __init__(
        self, config: FedConfig, layer_shapes: LayerShapes, recorder: RunRecorder | None = None
    ) -> None:
        self.config, self.method = config, config.method
        self.layer_shapes = dict(layer_shapes)
        self.recorder = recorder
        self.nodes: dict[int, Node] = {}
        self.shared: Arrays = {}
        #: The method's own server state (never sent; checkpointed with ``shared``).
        self.server_state: Arrays = {}
        self.shared_round = 0  # the round whose aggregation produced ``shared``
        #: The last round: num-server-rounds, unless a budget allows fewer.
        self.num_rounds = config.run.num_server_rounds
        #: Why the run ended before ``num_rounds`` (set by the round loop), or None.
        self.stopped: str | None = None
        self.tally = RoundTally()
        #: The last round's record (rounds.jsonl), with both protocols' scores.
        self.last_round: dict[str, Any] = {}
        self.screen = ReplyScreen(
            self.method,
            self.layer_shapes,
            config.faults.max_update_rms,
            config.faults.max_norm_ratio,
        )
        self.robust = config.robust
        #: Each client's aggregation weight under the ``weights`` policy: partition -> n_i.
        self.weights: dict[int, int] = {}
        #: The score the clients are ranked by (their discovery reports).
        self.metric = ACCURACY
        #: Rounds whose training was aggregated (this run, resumed rounds not counted).
        self.trained_rounds = 0
        #: Why training replies were lost: problem -> the clients it happened to.
        self.train_faults: defaultdict[str, list[int]] = defaultdict(list)

    # ------------------------------------------------------------------ set-up
    def connect(self, nodes: Iterable[Node]) -> ArrayRecord:
        """Take the discovered nodes and start from the method's initial shared state;
        returns it. ConfigError if a node's rank does not fit the model or the method."""
        nodes = sorted(nodes, key=lambda n: n.partition_id)
        for node in nodes:
            validate_rank(f"lora-rank of node {node.node_id}", node.rank, self.layer_shapes)
        ranks = sorted({n.rank for n in nodes})
        if len(ranks) > 1 and not self.method.heterogeneous:
            raise ConfigError(
                "ranks",
                f"strategy '{self.config.strategy}' needs one rank for "
                f"every client, but the nodes report ranks {ranks}; use "
                f"{', '.join(heterogeneous_methods())}",
            )
        metrics = sorted({n.metric for n in nodes})
        if len(metrics) > 1:
            raise ConfigError(
                "dataset",
                f"the nodes' data sets are of different kinds (scored by {metrics}); give "
                "every node classification data, or every node instruction data",
            )
        self.metric = metrics[0] if metrics else ACCURACY
        self.nodes = {n.node_id: n for n in nodes}
        self._weigh_claims(nodes)
        ranks = [n.rank for n in nodes]
        self.shared = self.method.initial_shared(self.layer_shapes, ranks)
        self.server_state = self.method.initial_server_state(self.layer_shapes, ranks)
        self.shared_round = 0
        return self.arrays

    def restore(self, checkpoint: Checkpoint) -> ArrayRecord:
        """Continue from ``checkpoint`` with the connected nodes, which must be the
        checkpoint's clients (ranks as they were then, e.g. after HetLoRA pruning);
        returns the restored shared state."""
        saved = {c["partition_id"]: c for c in checkpoint.clients}
        found = {n.partition_id for n in self.nodes.values()}
        if found != set(saved):
            raise ConfigError(
                "resume",
                f"the checkpoint has clients {sorted(saved)} but the "
                f"connected nodes are clients {sorted(found)}; start the same "
                "nodes (partition-id) as the interrupted run",
            )
        for node_id, node in self.nodes.items():
            if node.num_examples != saved[node.partition_id]["num_examples"]:
                raise ConfigError(
                    "resume",
                    f"client {node.partition_id} now has "
                    f"{node.num_examples} examples, the checkpoint "
                    f"{saved[node.partition_id]['num_examples']}; resume with "
                    "the same data and partitioning",
                )
            self.nodes[node_id] = dataclasses.replace(node, rank=saved[node.partition_id]["rank"])
        expected = {k: v.shape for k, v in self.shared.items()}
        saved_shapes = {k: v.shape for k, v in checkpoint.shared.items()}
        foreign = [k for k in saved_shapes if module_of(k) not in self.layer_shapes]
        if foreign or (expected and saved_shapes != expected):  # FLoRA's stack grows
            raise ConfigError(
                "resume",
                "the checkpoint's shared state does not fit this "
                "strategy, model and ranks; resume with the same run-config",
            )
        state_shapes = {k: v.shape for k, v in self.server_state.items()}
        if {k: v.shape for k, v in checkpoint.server_state.items()} != state_shapes:
            raise ConfigError(
                "resume",
                "the checkpoint's server state does not fit this strategy, model and "
                "ranks; resume with the same run-config",
            )
        self.shared = {k: np.array(v) for k, v in checkpoint.shared.items()}
        self.server_state = {k: np.array(v) for k, v in checkpoint.server_state.items()}
        self.shared_round = checkpoint.shared_round
        return self.arrays

    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything the server needs to continue after ``server_round``."""
        return Checkpoint(
            server_round,
            self.shared_round,
            self.shared,
            [
                {"partition_id": n.partition_id, "rank": n.rank, "num_examples": n.num_examples}
                for n in self.nodes.values()
            ],
            self.config.to_run_config(),
            self.strategy_state(),
            self.server_state,
        )

    def strategy_state(self) -> dict[str, Any]:
        """What a subclass must carry over a resume, beside the shared state (JSON)."""
        return {}

    def stop_reason(self) -> str | None:
        """Why no further training attempt may run (a spent budget), or None."""
        return None

    def summary_fields(self) -> dict[str, Any]:
        """The strategy's own figures for summary.json."""
        return {}

    @property
    def arrays(self) -> ArrayRecord:
        """The current shared state as Flower's global arrays."""
        return to_record(self.shared)

    # ------------------------------------------------------------- train phase
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.tally.server_round != server_round:
            self.tally = RoundTally(server_round)
        attempt = self.tally.attempts
        self.tally.attempts += 1
        self.tally.local_model_scores = []
        self.shared = to_numpy(arrays)
        config[FINAL_ROUND] = server_round == self.num_rounds
        sampled = self._sample(
            server_round, self.config.run.fraction_train, stream=0, attempt=attempt, grid=grid
        )
        log(INFO, "configure_train: %d of %d nodes", len(sampled), len(self.nodes))
        return self._messages(sampled, server_round, config, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        candidates: list[tuple[Node, Arrays, MetricRecord]] = []
        for reply, node in self._replies(replies, server_round, TRAIN):
            upload, metrics = (
                reply.content.array_records[ARRAYS],
                reply.content.metric_records[METRICS],
            )
            self.tally.receive(upload)
            problem, rank = self.screen.metrics_problem(node, metrics)
            problem = problem or self.screen.declared_problem(rank, upload, server_round)
            if problem:  # rejected before any array is read
                self._reject(server_round, node, problem)
                continue
            update = to_numpy(upload)
            problem = self.screen.upload_problem(rank, update, server_round)
            if problem:
                self._reject(server_round, node, problem)
                continue
            if rank != node.rank:
                log(
                    INFO,
                    "round %d: client %d pruned its rank %d -> %d",
                    server_round,
                    node.partition_id,
                    node.rank,
                    rank,
                )
                node = self.nodes[node.node_id] = dataclasses.replace(node, rank=rank)
            candidates.append((node, update, metrics))
        accepted = []
        for candidate, problem in zip(
            candidates,
            self.screen.size_problems([(node.rank, update) for node, update, _ in candidates]),
            strict=True,
        ):
            if problem:
                self._reject(server_round, candidate[0], problem)
            else:
                accepted.append(candidate)
        if len(accepted) < self.config.run.min_nodes:
            log(
                WARNING,
                "round %d: %d accepted updates, fewer than min-nodes=%d; the shared state is kept",
                server_round,
                len(accepted),
                self.config.run.min_nodes,
            )
            return None, None
        accepted.sort(key=lambda item: item[0].partition_id)
        started = time.perf_counter()
        self.shared = self.aggregate_updates(
            server_round, [u for _, u, _ in accepted], [n for n, _, _ in accepted]
        )
        self.shared_round = server_round
        self.trained_rounds += 1
        self.tally.aggregate_seconds = time.perf_counter() - started
        weights = np.array([number(m, NUM_EXAMPLES) for _, _, m in accepted])
        mean_loss = float(np.average([number(m, LOSS) for _, _, m in accepted], weights=weights))
        return self.arrays, MetricRecord({"train-loss": mean_loss})

    def aggregate_updates(
        self, server_round: int, updates: Sequence[Arrays], clients: Sequence[Node]
    ) -> Arrays:
        """The new shared state from the accepted updates (sorted by partition id): the
        method's rule, each client weighed by the ``weights`` policy; or, with
        ``aggregation`` or ``clip-norm`` set, the robust step over the clients' deltas."""
        weighed = [
            dataclasses.replace(n, num_examples=self.weights[n.partition_id]) for n in clients
        ]
        if not self.robust.replaces_rule:
            shared, self.server_state = self.method.server_step(
                self.shared, self.server_state, updates, weighed
            )
            return shared
        deltas = [
            self.method.shared_delta(self._installed(node), update)
            for node, update in zip(clients, updates, strict=True)
        ]
        return robust_step(
            self.shared,
            deltas,
            [self.method.delta_shapes(self.layer_shapes, n.rank) for n in clients],
            [n.num_examples for n in weighed],
            self.robust,
        )

    def _installed(self, client: Node) -> Arrays:
        """The shared tensors ``client`` started its round from: the leading block of
        each shared array at its rank (``delta_shapes``), as DP-FedAvg's step takes it."""
        blocks = self.method.delta_shapes(self.layer_shapes, client.rank)
        return {
            key: self.shared[key][leading_block(shape, self.shared[key].shape)]
            for key, shape in blocks.items()
        }

    # ---------------------------------------------------------- evaluate phase
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.shared = to_numpy(arrays)
        final = server_round == self.num_rounds
        config[FINAL_ROUND] = final
        if final:
            sampled = list(self.nodes.values()) if self.config.run.final_evaluation else []
        elif self.config.run.fraction_evaluate > 0:
            sampled = self._sample(server_round, self.config.run.fraction_evaluate, stream=1)
        else:
            sampled = []
        return self._messages(sampled, server_round, config, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        scores = [
            number(reply.content.metric_records[METRICS], self.metric)
            for reply, _ in self._replies(replies, server_round, EVALUATE)
        ]
        self.last_round = {
            **round_row(
                self.tally,
                self.shared_round < server_round,
                self.tally.local_model_scores,
                scores,
                self.metric,
            ),
            **self.round_fields(),
        }
        if self.recorder:
            self.recorder.round_row(self.last_round)
        log_round(self.last_round, self.num_rounds)
        if not scores:
            return None
        return MetricRecord(
            {
                f"mean-{self.metric}": self.last_round[f"evaluate_mean_{self.metric}"],
                f"worst-{self.metric}": self.last_round[f"evaluate_worst_{self.metric}"],
            }
        )

    def require_training(self) -> None:
        """RunFailed unless some round's training was aggregated: the headline is the
        clients' own error (the most frequent), else why their updates were left out."""
        if self.trained_rounds:
            return
        if self.stopped:
            raise RunFailed(f"no round trained: {self.stopped}")
        if self.train_faults:
            problem, clients = max(self.train_faults.items(), key=lambda item: len(item[1]))
            who = sorted(set(clients))
            raise RunFailed(
                f"no round trained: client{'s' if len(who) > 1 else ''} "
                f"{', '.join(map(str, who[:5]))}{', ...' if len(who) > 5 else ''}: {problem}"
            )
        raise RunFailed(
            "no round trained: no client update was accepted in any round (see the warnings above)"
        )

    def round_fields(self) -> dict[str, Any]:
        """The strategy's own fields of a rounds.jsonl row."""
        return {}

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> %s: %d nodes, ranks %s, fraction-train %.2f, fraction-evaluate "
            "%.2f, min-nodes %d",
            self.config.strategy,
            len(self.nodes),
            [n.rank for n in self.nodes.values()],
            self.config.run.fraction_train,
            self.config.run.fraction_evaluate,
            self.config.run.min_nodes,
        )

    # ----------------------------------------------------------------- helpers
    def sample_size(self, fraction: float) -> int:
        """Nodes drawn per round at ``fraction``: max(fraction * N, min-nodes), capped at N."""
        return min(len(self.nodes), max(int(len(self.nodes) * fraction), self.config.run.min_nodes))

    def _sample(
        self,
        server_round: int,
        fraction: float,
        stream: int,
        attempt: int = 0,
        grid: Grid | None = None,
    ) -> list[Node]:
        """Seeded sample of ``sample_size(fraction)`` nodes, of those ``grid`` reports
        online when given (all of them, or fewer if fewer are online); ``stream``
        separates the training draw (0) from the evaluation draw (1), ``attempt`` a
        retried round's draw from the first."""
        nodes = list(self.nodes.values())
        if grid is not None:
            online = set(grid.get_node_ids()) & set(self.nodes)
            if len(online) < len(nodes):
                log(
                    INFO,
                    "round %d: sampling among the %d of %d nodes online (offline: clients %s)",
                    server_round,
                    len(online),
                    len(nodes),
                    [n.partition_id for n in nodes if n.node_id not in online],
                )
                nodes = [n for n in nodes if n.node_id in online]
        count = min(len(nodes), self.sample_size(fraction))
        rng = np.random.default_rng([self.config.run.seed, server_round, stream, attempt])
        chosen = sorted(rng.choice(len(nodes), size=count, replace=False))
        return [nodes[i] for i in chosen]

    def _messages(
        self, nodes: Sequence[Node], server_round: int, config: ConfigRecord, message_type: str
    ) -> list[Message]:
        config[SERVER_ROUND] = server_round
        config[SHARED_ROUND] = self.shared_round
        self.tally.awaiting = {node.node_id for node in nodes}
        messages = self.tally.messages = []
        for node in nodes:
            arrays = to_record(self.method.download(self.shared, node))
            self.tally.send(node.node_id, arrays)
            messages.append(
                Message(
                    RecordDict({ARRAYS: arrays, CONFIG: config}),
                    dst_node_id=node.node_id,
                    message_type=message_type,
                )
            )
        return messages

    def _replies(
        self, replies: Iterable[Message], server_round: int, phase: str
    ) -> list[tuple[Message, Node]]:
        """Error-free replies from the nodes sent to; logs every failed or missing reply
        and records one metrics row per good one."""
        good, awaiting = [], set(self.tally.awaiting)
        sent_to = destinations(self.tally.messages)
        for reply in replies:
            sender = reply_sender(reply, sent_to)
            node = self.nodes.get(sender)
            if node is None or node.node_id not in awaiting:
                log(
                    WARNING,
                    "round %d: ignored a %s reply from node %d, which was not asked",
                    server_round,
                    phase,
                    sender,
                )
                continue
            awaiting.discard(node.node_id)
            problem = (
                f"{phase} failed: {reply.error.reason}"
                if reply.has_error()
                else _malformed(reply, phase)
            )
            if problem:
                self.tally.failed += 1
                if phase == TRAIN:
                    self.train_faults[problem].append(node.partition_id)
                log(
                    WARNING,
                    "round %d: node %d (client %d): %s",
                    server_round,
                    node.node_id,
                    node.partition_id,
                    problem,
                )
                continue
            good.append((reply, node))
            rows = client_rows(
                reply, node, server_round, phase, self.tally.sent.get(node.node_id, 0)
            )
            self.tally.local_model_scores += [
                row[self.metric] for row in rows if row["phase"] == LOCAL_MODEL
            ]
            for row in rows:
                if self.recorder:
                    self.recorder.client_row(row)
        for node_id in sorted(awaiting):
            self.tally.failed += 1
            log(
                WARNING,
                "round %d: no %s reply from node %d (client %d) within "
                "round-timeout=%g s (disconnected or too slow)",
                server_round,
                phase,
                node_id,
                self.nodes[node_id].partition_id,
                self.config.faults.round_timeout,
            )
        return good

    def _weigh_claims(self, nodes: Sequence[Node]) -> None:
        """Each client's weight under the ``weights`` policy; claims far from the median
        are logged with their node and client, whatever the policy."""
        claims = [n.num_examples for n in nodes]
        weights = claim_weights(claims, self.robust.weights, self.robust.weight_cap)
        self.weights = {n.partition_id: w for n, w in zip(nodes, weights, strict=True)}
        cap, rule = self.robust.weight_cap, self.robust.aggregation
        for i in outlying_claims(claims, cap):
            weighs = (
                f"aggregation='{rule}' weighs every client equally"
                if rule in (MEDIAN, TRIMMED_MEAN)
                else f"under weights='{self.robust.weights}' it weighs {weights[i]}"
            )
            log(
                WARNING,
                "node %d (client %d) claims %d training examples, more than weight-cap=%g "
                "times or under 1/%g of the median claim %g; %s",
                nodes[i].node_id,
                nodes[i].partition_id,
                claims[i],
                cap,
                cap,
                float(np.median(claims)),
                weighs,
            )

    def _reject(self, server_round: int, node: Node, problem: str) -> None:
        log(
            WARNING,
            "round %d: rejected update of node %d (client %d): %s",
            server_round,
            node.node_id,
            node.partition_id,
            problem,
        )
        self.tally.rejected += 1


def _malformed(reply: Message, phase: str) -> str | None:
    """What a reply lacks to be read, or None."""
    if METRICS not in reply.content:
        return f"malformed {phase} reply: no '{METRICS}' record"
    missing = [k for k in REPLY_METRICS if k not in reply.content.metric_records[METRICS]]
    if missing:
        return f"malformed {phase} reply: metrics lack {missing}"
    if phase == "train" and ARRAYS not in reply.content:
        return f"malformed train reply: no '{ARRAYS}' record"
    return None
