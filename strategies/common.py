"""Shared helpers of the LoRA strategies: rank discovery, the round loop (retries,
checkpoints, resume), per-node messages, reply screening, communication accounting
and run records. A strategy subclasses ``LoRAStrategy`` and supplies its initial
shared state, the shapes a client of a given rank uploads, and its aggregation rule
(a pure function from ``fedalora``)."""

from __future__ import annotations

import dataclasses
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedalora.checkpoint import Checkpoint
from fedalora.config import ConfigError, FedConfig, validate_rank
from fedalora.outputs import RunRecorder
from fedalora.screening import norm_problems, update_problem, update_rms
from fedalora.sharing import A, B, seeded_lora_a

Arrays = dict[str, np.ndarray]
Shapes = dict[str, tuple[int, ...]]
#: Record keys of every message in both directions.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
#: Metrics every train and evaluate reply carries.
REPLY_METRICS = ("num-examples", "loss", "accuracy", "seconds")


@dataclass(frozen=True)
class NodeInfo:
    """What a node reported about itself in the discovery query."""

    node_id: int
    partition_id: int
    rank: int
    num_examples: int


@dataclass
class RoundTally:
    """Communication and timing of the round in progress (over all its attempts)."""

    server_round: int = 0
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    skipped: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    aggregate_seconds: float = 0.0
    failed: int = 0  # error replies and missing replies, both phases
    rejected: int = 0  # updates screened out
    sent: dict[int, int] = field(default_factory=dict)  # node id -> bytes of its last message
    awaiting: set[int] = field(default_factory=set)  # node ids sent to in the current phase


def to_numpy(record: ArrayRecord) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record (element count x element size, no headers),
    read from each Array's shape and dtype without deserialising the data."""
    return int(sum(np.prod(array.shape, dtype=np.int64) * np.dtype(array.dtype).itemsize
                   for array in record.values()))


def lora_shapes(layer_shapes: Mapping[str, tuple[int, int]], rank: int,
                factors: tuple[str, ...] = (A, B)) -> Shapes:
    """Shapes of ``<module>.lora_A`` (rank x d_in) and/or ``<module>.lora_B`` (d_out x rank)."""
    shapes: Shapes = {}
    for m, (d_out, d_in) in layer_shapes.items():
        if A in factors:
            shapes[f"{m}.lora_A"] = (rank, d_in)
        if B in factors:
            shapes[f"{m}.lora_B"] = (d_out, rank)
    return shapes


def initial_lora(layer_shapes: Mapping[str, tuple[int, int]], rank: int, seed: int,
                 factors: tuple[str, ...] = (A, B)) -> Arrays:
    """The global LoRA init the server broadcasts: A = ``seeded_lora_a``, B = 0."""
    return {key: (seeded_lora_a(seed, key.rsplit(".", 1)[0], *shape) if key.endswith("lora_A")
                  else np.zeros(shape, np.float32))
            for key, shape in lora_shapes(layer_shapes, rank, factors).items()}


class LoRAStrategy(Strategy):
    """Per-node messages around a pure aggregation rule over the shared LoRA state."""

    #: Whether the rule can combine clients of different ranks.
    heterogeneous_ranks = False
    #: Whether a client may upload at a lower rank than before (HetLoRA self-pruning).
    ranks_can_shrink = False

    def __init__(self, config: FedConfig, layer_shapes: Mapping[str, tuple[int, int]],
                 recorder: RunRecorder | None = None) -> None:
        self.config = config
        self.layer_shapes = dict(layer_shapes)
        self.recorder = recorder
        self.nodes: dict[int, NodeInfo] = {}
        self.shared: Arrays = {}
        self.shared_round = 0  # the round whose aggregation produced ``shared``
        self._tally = RoundTally()

    # ------------------------------------------------------------ per strategy
    @abstractmethod
    def initial_shared(self) -> Arrays:
        """The shared state before round 1 (called once the nodes are known)."""

    @abstractmethod
    def upload_shapes(self, rank: int) -> Shapes:
        """Array names and shapes that a client of ``rank`` uploads."""

    @abstractmethod
    def aggregate(self, updates: list[Arrays], nodes: list[NodeInfo]) -> Arrays:
        """The new shared state from the accepted updates (sorted by partition id)."""

    # ---------------------------------------------------------------- discovery
    def discover(self, grid: Grid, timeout: float) -> dict[int, NodeInfo]:
        """Ask every connected node for its partition, rank and example count.

        Raises ConfigError before any training if a node fails or reports a rank the
        model or the strategy cannot take.
        """
        node_ids = _wait_for_nodes(grid, self.config.min_nodes, timeout)
        queries = [Message(RecordDict({CONFIG: ConfigRecord({"query": "node-info"})}),
                           dst_node_id=node_id, message_type=MessageType.QUERY)
                   for node_id in node_ids]
        nodes: dict[int, NodeInfo] = {}
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                raise ConfigError("node", f"node {node_id} failed before training: "
                                  f"{reply.error.reason}")
            info = reply.content[CONFIG]
            nodes[node_id] = NodeInfo(node_id, int(info["partition-id"]), int(info["rank"]),
                                      int(info["num-examples"]))
            validate_rank(f"lora-rank of node {node_id}", nodes[node_id].rank, self.layer_shapes)
        ranks = sorted({n.rank for n in nodes.values()})
        if len(ranks) > 1 and not self.heterogeneous_ranks:
            raise ConfigError("ranks", f"strategy '{self.config.strategy}' needs one rank for "
                              f"every client, but the nodes report ranks {ranks}; use "
                              f"{', '.join(FedConfig.heterogeneous_strategies())}")
        self.nodes = dict(sorted(nodes.items(), key=lambda item: item[1].partition_id))
        self.shared = self.initial_shared()
        return self.nodes

    # --------------------------------------------------------------- round loop
    def run(self, grid: Grid, train_config: ConfigRecord, evaluate_config: ConfigRecord,
            first_round: int = 1, on_round_end: Callable[[int], None] | None = None
            ) -> dict[int, MetricRecord]:
        """Rounds ``first_round`` .. num-server-rounds; returns each round's evaluation.

        A round whose training yields fewer than min-nodes accepted updates keeps the
        shared state and is rerun up to ``round-retries`` times (a fresh node sample
        each time), then skipped. ``on_round_end(round)`` follows each evaluation (the
        server's checkpoint).
        """
        self.summary()
        timeout, last = self.config.round_timeout, self.config.num_server_rounds
        evaluations: dict[int, MetricRecord] = {}
        for server_round in range(first_round, last + 1):
            log(INFO, "[ROUND %d/%d]", server_round, last)
            for attempt in range(self.config.round_retries + 1):
                replies = grid.send_and_receive(
                    self.configure_train(server_round, None, train_config, grid, attempt),
                    timeout=timeout)
                if self.aggregate_train(server_round, replies)[0] is not None:
                    break
                if attempt < self.config.round_retries:
                    log(WARNING, "round %d: retrying (%d of %d)", server_round, attempt + 1,
                        self.config.round_retries)
            else:
                self._tally.skipped = True
                log(WARNING, "round %d skipped after %d attempts; the shared state is that of "
                    "round %d", server_round, self.config.round_retries + 1, self.shared_round)
            replies = grid.send_and_receive(
                self.configure_evaluate(server_round, None, evaluate_config, grid),
                timeout=timeout)
            metrics = self.aggregate_evaluate(server_round, replies)
            if metrics is not None:
                evaluations[server_round] = metrics
            if on_round_end:
                on_round_end(server_round)
        return evaluations

    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything the server needs to continue after ``server_round``."""
        return Checkpoint(server_round, self.shared_round, self.shared,
                          [{"partition_id": n.partition_id, "rank": n.rank,
                            "num_examples": n.num_examples} for n in self.nodes.values()],
                          self.config.to_run_config())

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint`` with the freshly discovered nodes, which must be
        the checkpoint's clients (ranks as they were then, e.g. after HetLoRA pruning)."""
        saved = {c["partition_id"]: c for c in checkpoint.clients}
        found = {n.partition_id for n in self.nodes.values()}
        if found != set(saved):
            raise ConfigError("resume", f"the checkpoint has clients {sorted(saved)} but the "
                              f"connected nodes are clients {sorted(found)}; start the same "
                              "nodes (partition-id) as the interrupted run")
        for node_id, node in self.nodes.items():
            if node.num_examples != saved[node.partition_id]["num_examples"]:
                raise ConfigError("resume", f"client {node.partition_id} now has "
                                  f"{node.num_examples} examples, the checkpoint "
                                  f"{saved[node.partition_id]['num_examples']}; resume with "
                                  "the same data and partitioning")
            self.nodes[node_id] = dataclasses.replace(node,
                                                      rank=saved[node.partition_id]["rank"])
        expected = {k: v.shape for k, v in self.initial_shared().items()}
        saved_shapes = {k: v.shape for k, v in checkpoint.shared.items()}
        foreign = [k for k in saved_shapes if k.rsplit(".", 1)[0] not in self.layer_shapes]
        if foreign or (expected and saved_shapes != expected):  # FLoRA's stack grows
            raise ConfigError("resume", "the checkpoint's shared state does not fit this "
                              "strategy, model and ranks; resume with the same run-config")
        self.shared = {k: np.array(v) for k, v in checkpoint.shared.items()}
        self.shared_round = checkpoint.shared_round

    # -------------------------------------------------------------- train phase
    def configure_train(self, server_round: int, arrays: ArrayRecord | None,
                        config: ConfigRecord, grid: Grid | None,
                        attempt: int = 0) -> Iterable[Message]:
        if self._tally.server_round != server_round:
            self._tally = RoundTally(server_round)
        self._tally.attempts += 1
        sampled = self._sample(server_round, self.config.fraction_train, stream=0,
                               attempt=attempt)
        log(INFO, "configure_train: %d of %d nodes", len(sampled), len(self.nodes))
        return self._messages(sampled, server_round, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        candidates: list[tuple[NodeInfo, Arrays, MetricRecord]] = []
        for reply, node in self._replies(replies, server_round, "train"):
            update = to_numpy(reply.content[ARRAYS])
            self._tally.bytes_up += payload_bytes(reply.content[ARRAYS])
            problem, rank = self._screen(reply, node, update)
            if problem:
                self._reject(server_round, node, problem)
                continue
            if rank != node.rank:
                log(INFO, "round %d: client %d pruned its rank %d -> %d", server_round,
                    node.partition_id, node.rank, rank)
                node = self.nodes[node.node_id] = dataclasses.replace(node, rank=rank)
            candidates.append((node, update, reply.content[METRICS]))
        sizes = norm_problems([update_rms(u) for _, u, _ in candidates],
                              self.config.max_update_rms, self.config.max_norm_ratio)
        accepted = []
        for candidate, problem in zip(candidates, sizes, strict=True):
            if problem:
                self._reject(server_round, candidate[0], problem)
            else:
                accepted.append(candidate)
        if len(accepted) < self.config.min_nodes:
            log(WARNING, "round %d: %d accepted updates, fewer than min-nodes=%d; the shared "
                "state is kept", server_round, len(accepted), self.config.min_nodes)
            return None, None
        accepted.sort(key=lambda item: item[0].partition_id)
        started = time.perf_counter()
        self.shared = self.aggregate([u for _, u, _ in accepted], [n for n, _, _ in accepted])
        self.shared_round = server_round
        self._tally.aggregate_seconds = time.perf_counter() - started
        weights = np.array([m["num-examples"] for _, _, m in accepted], dtype=float)
        mean_loss = float(np.average([m["loss"] for _, _, m in accepted], weights=weights))
        return to_record(self.shared), MetricRecord({"train-loss": mean_loss})

    def _screen(self, reply: Message, node: NodeInfo, update: Arrays) -> tuple[str | None, int]:
        """Why a reply's update is unusable on its own (or None), and its rank."""
        metrics = reply.content[METRICS]
        if not (float(metrics["num-examples"]) > 0 and np.isfinite(metrics["num-examples"])):
            return f"num-examples is {metrics['num-examples']}, must be positive", node.rank
        if not np.isfinite(metrics["loss"]):
            return f"training loss is {metrics['loss']}", node.rank
        rank = int(metrics.get("rank", node.rank))
        problem = (self._rank_problem(node, rank) or
                   update_problem(update, self.upload_shapes(rank)))
        return problem, rank

    def _reject(self, server_round: int, node: NodeInfo, problem: str) -> None:
        log(WARNING, "round %d: rejected update of node %d (client %d): %s", server_round,
            node.node_id, node.partition_id, problem)
        self._tally.rejected += 1

    # ----------------------------------------------------------- evaluate phase
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        final = server_round == self.config.num_server_rounds
        config["final-round"] = final
        sampled = (list(self.nodes.values()) if final else
                   self._sample(server_round, self.config.fraction_evaluate, stream=1))
        return self._messages(sampled, server_round, config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        scores = [float(reply.content[METRICS]["accuracy"])
                  for reply, _ in self._replies(replies, server_round, "evaluate")]
        tally = self._tally
        row = {"round": server_round, "attempts": tally.attempts, "skipped": tally.skipped,
               "failed": tally.failed, "rejected": tally.rejected,
               "mean_accuracy": float(np.mean(scores)) if scores else None,
               "worst_accuracy": float(np.min(scores)) if scores else None,
               "num_evaluated": len(scores), "bytes_up": tally.bytes_up,
               "bytes_down": tally.bytes_down, "aggregate_seconds": tally.aggregate_seconds,
               "seconds": time.perf_counter() - tally.started}
        if self.recorder:
            self.recorder.round_row(row)
        log(INFO, "round %d/%d | mean acc %s | worst acc %s | up %.2f MB | down %.2f MB | "
            "aggregate %.3f s | round %.1f s", server_round, self.config.num_server_rounds,
            _fmt(row["mean_accuracy"]), _fmt(row["worst_accuracy"]), tally.bytes_up / 1e6,
            tally.bytes_down / 1e6, tally.aggregate_seconds, row["seconds"])
        if not scores:
            return None
        return MetricRecord({"mean-accuracy": row["mean_accuracy"],
                             "worst-accuracy": row["worst_accuracy"]})

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %d nodes, ranks %s, fraction-train %.2f, fraction-evaluate "
            "%.2f, min-nodes %d", self.config.strategy, len(self.nodes),
            [n.rank for n in self.nodes.values()], self.config.fraction_train,
            self.config.fraction_evaluate, self.config.min_nodes)

    # ------------------------------------------------------------------ helpers
    def download(self, node: NodeInfo) -> Arrays:
        """What ``node`` receives; the same shared state for every node by default."""
        return self.shared

    @property
    def max_rank(self) -> int:
        """The largest rank among the discovered nodes."""
        return max(n.rank for n in self.nodes.values())

    def scales(self, nodes: list[NodeInfo]) -> list[float]:
        """Each node's LoRA scale s_i, by the rule its client applies."""
        return [self.config.scale(n.rank) for n in nodes]

    def _rank_problem(self, node: NodeInfo, rank: int) -> str | None:
        if rank == node.rank or (self.ranks_can_shrink and 1 <= rank < node.rank):
            return None
        return f"reports rank {rank} but has rank {node.rank}"

    def _sample(self, server_round: int, fraction: float, stream: int,
                attempt: int = 0) -> list[NodeInfo]:
        """Seeded sample of max(fraction * N, min-nodes) nodes, capped at N; ``stream``
        separates the training draw (0) from the evaluation draw (1), ``attempt`` a
        retried round's draw from the first."""
        nodes = list(self.nodes.values())
        count = min(len(nodes), max(int(len(nodes) * fraction), self.config.min_nodes))
        rng = np.random.default_rng([self.config.seed, server_round, stream, attempt])
        chosen = sorted(rng.choice(len(nodes), size=count, replace=False))
        return [nodes[i] for i in chosen]

    def _messages(self, nodes: list[NodeInfo], server_round: int, config: ConfigRecord,
                  message_type: str) -> list[Message]:
        config["server-round"] = server_round
        config["shared-round"] = self.shared_round
        self._tally.awaiting = {node.node_id for node in nodes}
        messages = []
        for node in nodes:
            arrays = to_record(self.download(node))
            self._tally.sent[node.node_id] = payload_bytes(arrays)
            self._tally.bytes_down += self._tally.sent[node.node_id]
            messages.append(Message(RecordDict({ARRAYS: arrays, CONFIG: config}),
                                    dst_node_id=node.node_id, message_type=message_type))
        return messages

    def _replies(self, replies: Iterable[Message], server_round: int, phase: str
                 ) -> list[tuple[Message, NodeInfo]]:
        """Error-free replies from the nodes sent to; logs every failed or missing reply
        and records one metrics row per good one."""
        good, awaiting = [], set(self._tally.awaiting)
        for reply in replies:
            node = self.nodes.get(reply.metadata.src_node_id)
            if node is None or node.node_id not in awaiting:
                log(WARNING, "round %d: ignored a %s reply from node %d, which was not asked",
                    server_round, phase, reply.metadata.src_node_id)
                continue
            awaiting.discard(node.node_id)
            problem = (f"{phase} failed: {reply.error.reason}" if reply.has_error()
                       else _malformed(reply, phase))
            if problem:
                self._tally.failed += 1
                log(WARNING, "round %d: node %d (client %d): %s", server_round, node.node_id,
                    node.partition_id, problem)
                continue
            good.append((reply, node))
            if self.recorder:
                self.recorder.client_row(self._client_row(reply, node, server_round, phase))
        for node_id in sorted(awaiting):
            self._tally.failed += 1
            log(WARNING, "round %d: no %s reply from node %d (client %d) within "
                "round-timeout=%g s (disconnected or too slow)", server_round, phase, node_id,
                self.nodes[node_id].partition_id, self.config.round_timeout)
        return good

    def _client_row(self, reply: Message, node: NodeInfo, server_round: int,
                    phase: str) -> dict:
        metrics = reply.content[METRICS]
        up = payload_bytes(reply.content[ARRAYS]) if ARRAYS in reply.content else 0
        extra = {k.replace("-", "_"): float(v) for k, v in metrics.items()
                 if k not in ("num-examples", "rank", "loss", "accuracy", "seconds")}
        return {"round": server_round, "client": node.partition_id,
                "rank": int(metrics.get("rank", node.rank)),
                "phase": phase, "num_examples": int(metrics["num-examples"]),
                "loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]), **extra,
                "bytes_up": up, "bytes_down": self._tally.sent.get(node.node_id, 0),
                "seconds": float(metrics["seconds"])}


def _malformed(reply: Message, phase: str) -> str | None:
    """What a reply lacks to be read, or None."""
    if METRICS not in reply.content:
        return f"malformed {phase} reply: no '{METRICS}' record"
    missing = [k for k in REPLY_METRICS if k not in reply.content[METRICS]]
    if missing:
        return f"malformed {phase} reply: metrics lack {missing}"
    if phase == "train" and ARRAYS not in reply.content:
        return f"malformed train reply: no '{ARRAYS}' record"
    return None


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise ConfigError("min-nodes", f"only {len(node_ids)} nodes connected within "
                              f"{timeout:.0f} s, min-nodes={minimum}; start more nodes or "
                              "lower min-nodes")
        log(INFO, "waiting for nodes: %d connected, min-nodes=%d", len(node_ids), minimum)
        time.sleep(1.0)
    return node_ids


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
