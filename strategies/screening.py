"""Reply screening: which uploads may enter an aggregate (the checks themselves are
the pure functions of ``fedalora.screening``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedalora.methods import Method, Participant
from fedalora.privacy import LOCAL, DPSettings, norm_problem
from fedalora.screening import (
    Declared,
    declared_problem,
    norm_problems,
    update_problem,
)
from fedalora.types import Arrays, LayerShapes, Shapes

from .protocol import LOSS, NUM_EXAMPLES, UPLOAD_RANK, number


class ReplyScreen:
    """An upload is rejected when its metrics are unusable (its example count is not the
    one the client claimed at discovery), its rank is not the client's (a lower one only
    where the method lets ranks shrink), its declared arrays do not fit the method's
    upload of that rank (checked before anything is read), its keys, shapes or dtype
    differ from that upload, it holds NaN/Inf, or the update it applies is implausibly
    large (``max-update-rms``, ``max-norm-ratio`` times the round's median)."""

    def __init__(
        self,
        method: Method,
        layer_shapes: LayerShapes,
        max_update_rms: float,
        max_norm_ratio: float,
    ) -> None:
        self.method, self.layer_shapes = method, layer_shapes
        self.max_update_rms, self.max_norm_ratio = max_update_rms, max_norm_ratio

    def metrics_problem(self, client: Participant, metrics: MetricRecord) -> tuple[str | None, int]:
        """Why a reply's metrics are unusable (or None), and the rank it reports."""
        count = number(metrics, NUM_EXAMPLES)
        if not (count > 0 and np.isfinite(count)):
            return f"num_examples is {metrics[NUM_EXAMPLES]}, must be positive", client.rank
        if count != client.num_examples:
            return (
                f"claims {metrics[NUM_EXAMPLES]} training examples, but "
                f"{client.num_examples} at discovery",
                client.rank,
            )
        if not np.isfinite(number(metrics, LOSS)):
            return f"training loss is {metrics[LOSS]}", client.rank
        rank = int(number(metrics, UPLOAD_RANK)) if UPLOAD_RANK in metrics else client.rank
        shrunk = self.method.ranks_can_shrink and 1 <= rank < client.rank
        if rank != client.rank and not shrunk:
            return f"reports rank {rank} but has rank {client.rank}", client.rank
        return None, rank

    def declared_problem(self, rank: int, record: ArrayRecord, server_round: int) -> str | None:
        """Why an upload at ``rank`` in ``server_round`` cannot fit, from what its arrays
        declare (unread)."""
        declared = {
            key: Declared(tuple(array.shape), str(array.dtype), len(array.data))
            for key, array in record.items()
        }
        return declared_problem(declared, self.bounds(rank, server_round))

    def bounds(self, rank: int, server_round: int) -> Shapes:
        """The largest arrays an upload at ``rank`` in ``server_round`` may hold."""
        method = self.method
        dense = method.upload_shapes(self.layer_shapes, rank, server_round)
        return method.upload_format().bounds(dense)

    def upload_problem(self, rank: int, update: Arrays, server_round: int) -> str | None:
        """Why an upload at ``rank`` in ``server_round`` does not have the method's form,
        or None."""
        method = self.method
        dense = method.upload_shapes(self.layer_shapes, rank, server_round)
        return method.upload_format().problem(dense, update)

    def size_problems(self, updates: Sequence[tuple[int, Arrays]]) -> list[str | None]:
        """Per well-formed upload of a round (its rank and arrays), why the update it
        applies is implausibly large, or None."""
        return norm_problems(
            [self.method.applied_size(u, rank) for rank, u in updates],
            self.max_update_rms,
            self.max_norm_ratio,
        )


class PrivateReplyScreen(ReplyScreen):
    """Under client-level DP an upload is the client's update in the method's
    ``delta_shapes``, and in central mode its norm must be within ``dp-clip`` (the
    server checks what the clients were asked to do). No size screen: clipping bounds
    every update, and local noise makes sizes meaningless."""

    def __init__(self, method: Method, layer_shapes: LayerShapes, dp: DPSettings) -> None:
        super().__init__(method, layer_shapes, max_update_rms=math.inf, max_norm_ratio=0.0)
        self.dp = dp

    def bounds(self, rank: int, server_round: int) -> Shapes:
        return self.method.delta_shapes(self.layer_shapes, rank)

    def upload_problem(self, rank: int, update: Arrays, server_round: int) -> str | None:
        problem = update_problem(update, self.bounds(rank, server_round))
        if problem or self.dp.mode == LOCAL:
            return problem
        return norm_problem(update, self.dp.clip)

    def size_problems(self, updates: Sequence[tuple[int, Arrays]]) -> list[str | None]:
        return [None] * len(updates)
