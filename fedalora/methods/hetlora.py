"""HetLoRA: zero-padding weighted by the norm of each client's update, with optional
rank self-pruning.

Paper: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024 (arXiv:2401.06432).

Rule, per adapted layer: client i uploads A_i (r_i x d_in) and B_i (d_out x r_i).
The server pads both to r_max with zeros and sets X <- sum_i w_i pad(X_i) over ALL
clients (a slot a client lacks counts as zero), with sparsity weights
w_i = ||s_i B_i A_i||_F / sum_j ||s_j B_j A_j||_F (from r x r Gram matrices, never
the d_out x d_in product; equal weights for a layer where every update is zero). It
broadcasts the padded factors; each client takes its first r_i. Round 1 starts from
A = seeded Kaiming-uniform, B = 0. Scaling: s_i = s(r_i) from run-config
``scaling``, used by the client and in the server's norms alike.
Rank self-pruning (``rank-decay`` gamma < 1): after local training a client compares
||s B[:, k:] A[k:]||_F, k = floor(gamma r_i), summed over layers, with its value last
round; if it fell, the client cuts its rank to k and uploads at that rank from then
on. The cut uploads A[:k] and B[:, :k] s(r) / s(k), so that s(k) B A at rank k is
the kept s(r) B[:, :k] A[:k] (only the tail is dropped), for the client and the
server's norms alike. ``rank-penalty`` lambda adds lambda times that norm to the local
loss, so that the tail fades (the paper's regulariser).
Up per client per layer: r_i (d_in + d_out) floats; down: r_max (d_in + d_out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..adapters import ClientAdapter
from ..aggregation import hetlora_average, truncate_rank
from ..errors import require
from ..types import Arrays, Tensors
from .base import MethodOptions, Paper, Participant
from .lora_factors import padded_rank
from .registry import register_method
from .zeropad import ZeroPadding

#: Keys of the client's bookkeeping: its current rank and last round's tail norm.
RANK, TAIL_NORM = "rank", "tail-norm"


@dataclass(frozen=True)
class RankPruningOptions(MethodOptions):
    rank_decay: float = field(
        default=1.0,
        metadata={
            "help": "HetLoRA's pruning factor gamma in (0, 1]: a client whose components "
            "beyond floor(gamma r) faded cuts its rank to that; 1 turns pruning off"
        },
    )
    rank_penalty: float = field(
        default=0.0,
        metadata={
            "help": "weight lambda of the norm of those components in the local loss; 0 = off"
        },
    )

    def validate(self) -> None:
        require(
            0.0 < self.rank_decay <= 1.0,
            "rank-decay",
            "must be in (0, 1]: HetLoRA's pruning factor gamma; 1 turns pruning off",
        )
        require(self.rank_penalty >= 0.0, "rank-penalty", "must be >= 0 (0 turns it off)")


@register_method
class HetLoRA(ZeroPadding):
    """Zero-padding with norm-proportional weights; clients may prune their rank."""

    name = "hetlora"
    paper = Paper(
        "Cho et al.",
        "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
        "EMNLP 2024",
        "2401.06432",
    )
    nonlinear_reason = (
        "its weights are the updates' own norms and its ranks shrink with them, so "
        "one client's influence on the aggregate is not bounded by clipping"
    )
    ranks_can_shrink = True
    Options = RankPruningOptions
    options: RankPruningOptions

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        scales = [self.scaling.scale(c.rank) for c in clients]
        return hetlora_average(updates, scales, padded_rank(shared))

    def client_rank(self, rank: int, state: Tensors) -> int:
        """The rank left by earlier pruning, else the client's own."""
        return int(state[RANK]) if RANK in state else rank

    def loss_penalty(self, adapter: ClientAdapter) -> Callable[[], torch.Tensor] | None:
        keep = self._keep(adapter)
        if self.options.rank_penalty <= 0 or keep >= adapter.rank:
            return None
        return lambda: self.options.rank_penalty * tail_norm(adapter, keep)

    def upload(self, adapter: ClientAdapter) -> Arrays:
        """The factors, cut to rank k when the tail norm fell since last round (then
        there is no tail to compare until next round's), B rescaled to keep the kept
        components' update; remembers the rank and the tail norm."""
        upload = super().upload(adapter)
        if self.options.rank_decay >= 1.0:
            return upload
        keep, rank = self._keep(adapter), adapter.rank
        previous = adapter.state.pop(TAIL_NORM, None)
        if keep < rank:
            with torch.no_grad():
                tail = float(tail_norm(adapter, keep))
            if previous is not None and tail < float(previous):  # s(k) B' A' = s(r) B A
                rescale = self.scaling.scale(rank) / self.scaling.scale(keep)
                upload, rank = truncate_rank(upload, keep, rescale), keep
            else:
                adapter.state[TAIL_NORM] = torch.tensor(tail)
        adapter.state[RANK] = torch.tensor(rank)
        return upload

    def _keep(self, adapter: ClientAdapter) -> int:
        return max(1, math.floor(self.options.rank_decay * adapter.rank))


def tail_norm(adapter: ClientAdapter, keep: int) -> torch.Tensor:
    """||s B[:, keep:] A[keep:]||_F over all adapted layers (differentiable; from r x r
    Gram matrices, with a tiny floor so that the gradient at zero is finite)."""
    tensors = adapter.tensors()
    total = sum(
        ((b.T @ b) * (a @ a.T)).sum()
        for a, b in (
            (tensors[f"{m}.lora_A"][keep:], tensors[f"{m}.lora_B"][:, keep:])
            for m in adapter.targets
        )
    )
    assert isinstance(total, torch.Tensor)
    return adapter.scale * torch.sqrt(total.clamp_min(0) + 1e-12)
