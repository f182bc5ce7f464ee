"""One Flower strategy for every federated method: messages to the nodes hosting the
sampled clients around the method's pure aggregation rule (``fedalora.methods``).

It honours Flower's ``Strategy`` contract: ``configure_train`` / ``configure_evaluate``
sample clients (not nodes) and turn the current global ``arrays`` into one message per
node hosting sampled clients, with each client's own ``download``; ``aggregate_train``
reads each client's upload from its node's reply and returns the new global arrays
(None when too few updates were accepted), ``aggregate_evaluate`` the clients' mean and
worst score, so ``Strategy.start`` can drive it; ``round_loop.run_rounds`` adds resuming
and retries. Everything is keyed by client (partition id): a node is only where a
client's message goes. Hand it the discovered clients with ``connect`` and, to resume,
the checkpoint with ``restore``. Its collaborators: ``RoundTally`` (traffic and timing),
``ReplyScreen`` (which uploads may enter) and ``records`` (the run's rows).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
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
from .discovery import Node, listed
from .protocol import (
    ACCURACY,
    ARRAYS,
    CLIENTS,
    CONFIG,
    FINAL_ROUND,
    LOSS,
    METRICS,
    NUM_EXAMPLES,
    REPLY_METRICS,
    SERVER_ROUND,
    SHARED_ROUND,
    destinations,
    keyed,
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
        #: The clients by partition id, each with the node hosting it.
        self.clients: dict[int, Node] = {}
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
        """Take the discovered clients and start from the method's initial shared state;
        returns it. ConfigError if a client's rank does not fit the model or the method."""
        nodes = sorted(nodes, key=lambda n: n.partition_id)
        for node in nodes:
            validate_rank(
                f"lora-rank of client {node.partition_id} (node {node.node_id})",
                node.rank,
                self.layer_shapes,
            )
        ranks = sorted({n.rank for n in nodes})
        if len(ranks) > 1 and not self.method.heterogeneous:
            raise ConfigError(
                "ranks",
                f"strategy '{self.config.strategy}' needs one rank for "
                f"every client, but the clients have ranks {ranks}; use "
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
        self.clients = {n.partition_id: n for n in nodes}
        self._weigh_claims(nodes)
        ranks = [n.rank for n in nodes]
        self.shared = self.method.initial_shared(self.layer_shapes, ranks)
        self.server_state = self.method.initial_server_state(self.layer_shapes, ranks)
        self.shared_round = 0
        return self.arrays

    def restore(self, checkpoint: Checkpoint) -> ArrayRecord:
        """Continue from ``checkpoint`` with the connected clients, which must be the
        checkpoint's (ranks as they were then, e.g. after HetLoRA pruning); returns the
        restored shared state."""
        saved = {c["partition_id"]: c for c in checkpoint.clients}
        found = set(self.clients)
        if found != set(saved):
            raise ConfigError(
                "resume",
                f"the checkpoint has clients {sorted(saved)} but the "
                f"connected nodes host clients {sorted(found)}; start the same "
                "nodes (partition-id, num-clients) as the interrupted run",
            )
        for partition_id, node in self.clients.items():
            if node.num_examples != saved[node.partition_id]["num_examples"]:
                raise ConfigError(
                    "resume",
                    f"client {node.partition_id} now has "
                    f"{node.num_examples} examples, the checkpoint "
                    f"{saved[node.partition_id]['num_examples']}; resume with "
                    "the same data and partitioning",
                )
            self.clients[partition_id] = dataclasses.replace(node, rank=saved[partition_id]["rank"])
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
                for n in self.clients.values()
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
        log(
            INFO,
            "configure_train: %d of %d clients (on %d nodes)",
            len(sampled),
            len(self.clients),
            len({n.node_id for n in sampled}),
        )
        return self._messages(sampled, server_round, config, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        candidates: list[tuple[Node, Arrays, MetricRecord]] = []
        for node, metrics, upload in self._replies(replies, server_round, TRAIN):
            assert upload is not None  # a train reply without it is malformed
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
                node = self.clients[node.partition_id] = dataclasses.replace(node, rank=rank)
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
            sampled = list(self.clients.values()) if self.config.run.final_evaluation else []
        elif self.config.run.fraction_evaluate > 0:
            sampled = self._sample(server_round, self.config.run.fraction_evaluate, stream=1)
        else:
            sampled = []
        return self._messages(sampled, server_round, config, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        scores = [
            number(metrics, self.metric)
            for _, metrics, _ in self._replies(replies, server_round, EVALUATE)
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
            "\t├──> %s: %d clients on %d nodes, ranks %s, fraction-train %.2f, "
            "fraction-evaluate %.2f, min-nodes %d",
            self.config.strategy,
            len(self.clients),
            len({n.node_id for n in self.clients.values()}),
            _ranks_line([n.rank for n in self.clients.values()]),
            self.config.run.fraction_train,
            self.config.run.fraction_evaluate,
            self.config.run.min_nodes,
        )

    # ----------------------------------------------------------------- helpers
    def sample_size(self, fraction: float) -> int:
        """Clients drawn per round at ``fraction``: max(fraction * N, min-nodes), capped at
        N."""
        total = len(self.clients)
        return min(total, max(int(total * fraction), self.config.run.min_nodes))

    def _sample(
        self,
        server_round: int,
        fraction: float,
        stream: int,
        attempt: int = 0,
        grid: Grid | None = None,
    ) -> list[Node]:
        """Seeded sample of ``sample_size(fraction)`` clients, of those whose node ``grid``
        reports online when given (all of them, or fewer if fewer are online);
        ``stream`` separates the training draw (0) from the evaluation draw (1),
        ``attempt`` a retried round's draw from the first."""
        clients = list(self.clients.values())
        if grid is not None:
            online = set(grid.get_node_ids())
            offline = [n.partition_id for n in clients if n.node_id not in online]
            if offline:
                log(
                    INFO,
                    "round %d: sampling among the %d of %d clients whose node is online "
                    "(offline: clients %s)",
                    server_round,
                    len(clients) - len(offline),
                    len(clients),
                    listed(offline),
                )
                clients = [n for n in clients if n.node_id in online]
        count = min(len(clients), self.sample_size(fraction))
        rng = np.random.default_rng([self.config.run.seed, server_round, stream, attempt])
        chosen = sorted(rng.choice(len(clients), size=count, replace=False))
        return [clients[i] for i in chosen]

    def _messages(
        self, clients: Sequence[Node], server_round: int, config: ConfigRecord, message_type: str
    ) -> list[Message]:
        """One message per node hosting some of ``clients``: their partition ids in its
        config, and each one's download as ``arrays.<partition id>``."""
        config[SERVER_ROUND] = server_round
        config[SHARED_ROUND] = self.shared_round
        by_node: defaultdict[int, list[Node]] = defaultdict(list)
        for client in clients:
            by_node[client.node_id].append(client)
        self.tally.awaiting = {
            node_id: [c.partition_id for c in hosted] for node_id, hosted in by_node.items()
        }
        messages = self.tally.messages = []
        for node_id, hosted in by_node.items():
            content = RecordDict(
                {CONFIG: ConfigRecord({**config, CLIENTS: [c.partition_id for c in hosted]})}
            )
            for client in hosted:
                arrays = to_record(self.method.download(self.shared, client))
                self.tally.send(client.partition_id, arrays)
                content[keyed(ARRAYS, client.partition_id)] = arrays
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type))
        return messages

    def _replies(
        self, replies: Iterable[Message], server_round: int, phase: str
    ) -> list[tuple[Node, MetricRecord, ArrayRecord | None]]:
        """Each asked client's metrics (and upload) from the error-free replies of the
        nodes sent to; logs every failed or missing reply once with the clients it was
        for, and records one metrics row per good client."""
        good = []
        awaiting = dict(self.tally.awaiting)
        sent_to = destinations(self.tally.messages)
        for reply in replies:
            sender = reply_sender(reply, sent_to)
            asked = awaiting.pop(sender, None)
            if asked is None:
                log(
                    WARNING,
                    "round %d: ignored a %s reply from node %d, which was not asked",
                    server_round,
                    phase,
                    sender,
                )
                continue
            if reply.has_error():
                self._fail(
                    server_round, phase, sender, asked, f"{phase} failed: {reply.error.reason}"
                )
                continue
            for partition_id in asked:
                client = self.clients[partition_id]
                malformed = _malformed(reply, phase, partition_id)
                if malformed:
                    self._fail(server_round, phase, sender, [partition_id], malformed)
                    continue
                metrics = reply.content.metric_records[keyed(METRICS, partition_id)]
                uploads = reply.content.array_records
                upload = uploads.get(keyed(ARRAYS, partition_id)) if phase == TRAIN else None
                good.append((client, metrics, upload))
                rows = client_rows(
                    metrics,
                    upload,
                    client,
                    server_round,
                    phase,
                    self.tally.sent.get(partition_id, 0),
                )
                self.tally.local_model_scores += [
                    row[self.metric] for row in rows if row["phase"] == LOCAL_MODEL
                ]
                for row in rows:
                    if self.recorder:
                        self.recorder.client_row(row)
        for node_id, asked in sorted(awaiting.items()):
            self._fail(
                server_round,
                phase,
                node_id,
                asked,
                f"no {phase} reply within round-timeout={self.config.faults.round_timeout:g} s "
                "(disconnected or too slow)",
            )
        return good

    def _fail(
        self, server_round: int, phase: str, node_id: int, clients: Sequence[int], problem: str
    ) -> None:
        """``clients`` of node ``node_id`` failed with ``problem``: counted per client,
        logged once."""
        self.tally.failed += len(clients)
        if phase == TRAIN:
            self.train_faults[problem] += clients
        log(
            WARNING,
            "round %d: node %d (client%s %s): %s",
            server_round,
            node_id,
            "s" if len(clients) > 1 else "",
            listed(list(clients)),
            problem,
        )

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


def _malformed(reply: Message, phase: str, partition_id: int) -> str | None:
    """What a reply lacks to be read for client ``partition_id``, or None."""
    metrics = keyed(METRICS, partition_id)
    if metrics not in reply.content:
        return f"malformed {phase} reply: no '{metrics}' record"
    missing = [k for k in REPLY_METRICS if k not in reply.content.metric_records[metrics]]
    if missing:
        return f"malformed {phase} reply: metrics lack {missing}"
    arrays = keyed(ARRAYS, partition_id)
    if phase == TRAIN and arrays not in reply.content:
        return f"malformed train reply: no '{arrays}' record"
    return None


def _ranks_line(ranks: Sequence[int]) -> str:
    """The clients' ranks, or how many clients have each rank when there are many."""
    if len(ranks) <= 16:
        return str(list(ranks))
    counts = sorted(Counter(ranks).items(), reverse=True)
    return ", ".join(f"{count} x rank {rank}" for rank, count in counts)
