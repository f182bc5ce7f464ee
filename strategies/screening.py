"""Reply screening: which uploads may enter an aggregate (the checks themselves are
the pure functions of ``fedalora.screening``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.app import MetricRecord

from fedalora.methods import Method, Participant
from fedalora.privacy import LOCAL, DPSettings, norm_problem
from fedalora.screening import norm_problems, update_problem, update_rms
from fedalora.types import Arrays, LayerShapes
from protocol import LOSS, NUM_EXAMPLES, UPLOAD_RANK, number


class ReplyScreen:
    """An upload is rejected when its metrics are unusable, its rank is not the client's
    (a lower one only where the method lets ranks shrink), its keys, shapes or dtype
    differ from what the method expects of that rank, it holds NaN/Inf, or its size is
    implausible (``max-update-rms``, ``max-norm-ratio`` times the round's median)."""

    def __init__(
        self,
        method: Method,
        layer_shapes: LayerShapes,
        max_update_rms: float,
        max_norm_ratio: float,
    ) -> None:
        self.method, self.layer_shapes = method, layer_shapes
        self.max_update_rms, self.max_norm_ratio = max_update_rms, max_norm_ratio

    def form_problem(
        self, client: Participant, update: Arrays, metrics: MetricRecord
    ) -> tuple[str | None, int]:
        """Why one upload is unusable on its own (or None), and the rank it reports."""
        if not (number(metrics, NUM_EXAMPLES) > 0 and np.isfinite(number(metrics, NUM_EXAMPLES))):
            return f"num_examples is {metrics[NUM_EXAMPLES]}, must be positive", client.rank
        if not np.isfinite(number(metrics, LOSS)):
            return f"training loss is {metrics[LOSS]}", client.rank
        rank = int(number(metrics, UPLOAD_RANK)) if UPLOAD_RANK in metrics else client.rank
        shrunk = self.method.ranks_can_shrink and 1 <= rank < client.rank
        if rank != client.rank and not shrunk:
            return f"reports rank {rank} but has rank {client.rank}", client.rank
        return self.upload_problem(rank, update), rank

    def upload_problem(self, rank: int, update: Arrays) -> str | None:
        """Why an upload at ``rank`` does not have the method's form, or None."""
        return self.method.upload_problem(self.layer_shapes, rank, update)

    def size_problems(self, updates: Sequence[Arrays]) -> list[str | None]:
        """Per well-formed upload of a round, why its size is implausible, or None."""
        return norm_problems(
            [update_rms(u) for u in updates], self.max_update_rms, self.max_norm_ratio
        )


class PrivateReplyScreen(ReplyScreen):
    """Under client-level DP an upload is the client's update in the method's
    ``delta_shapes``, and in central mode its norm must be within ``dp-clip`` (the
    server checks what the clients were asked to do). No size screen: clipping bounds
    every update, and local noise makes sizes meaningless."""

    def __init__(self, method: Method, layer_shapes: LayerShapes, dp: DPSettings) -> None:
        super().__init__(method, layer_shapes, max_update_rms=math.inf, max_norm_ratio=0.0)
        self.dp = dp

    def upload_problem(self, rank: int, update: Arrays) -> str | None:
        problem = update_problem(update, self.method.delta_shapes(self.layer_shapes, rank))
        if problem or self.dp.mode == LOCAL:
            return problem
        return norm_problem(update, self.dp.clip)

    def size_problems(self, updates: Sequence[Arrays]) -> list[str | None]:
        return [None] * len(updates)
