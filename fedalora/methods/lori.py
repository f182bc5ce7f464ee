"""LoRI: a frozen random A shared by every party, and B trained under a sparse mask.

Paper: Zhang et al., "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank
Adaptation", arXiv preprint (arXiv:2504.07448).

A: every party regenerates one r_max x d_in A per layer from the run seed (PEFT's
Kaiming-uniform init, as the paper's A; ``seeded_lora_a``); client i uses its first r_i
rows, frozen, so averaging B is exact: sum_i p_i B_i A = (sum_i p_i B_i) A.

LoRI-D (``lori-sparsity=0``): B is dense; client i uploads B_i (d_out x r_i).

LoRI-S (``lori-sparsity=s``, 0.9 by default), design choices for a federation:
- Calibration: in rounds 1 .. C (``lori-calibration-rounds``) clients train B densely.
  After its training in round C (or, if not sampled then, its first training after
  it), a client keeps the (1 - s) share of its trained B's entries with the largest
  magnitude, over all adapted layers and projections together (the paper's one global
  threshold; exactly round((1 - s) N) entries) as its mask. Masks are per client and
  private, task-specific as the paper's are per task.
- Training under the mask: from round C + 1 a calibrated client restarts from B = 0
  (the paper retrains from scratch under the mask) and trains only the masked entries:
  their gradients are zeroed elsewhere, as the paper's masked optimiser does (weight
  decay, 0 by default, would also shrink the others).
- Upload: per layer the masked entries' values (``lora_B.values``, float32) and the
  mask packed 8 entries to a byte (``lora_B.mask``): (1 - s) of the dense floats plus
  1/32. Before calibration the mask is every entry.

Aggregation (both): each entry of B is averaged over the clients whose mask keeps it,
weights p_i = n_i / sum(n) renormalised over them (``masked_average``); an entry no
client keeps is 0. With one mask for every client (LoRI-D, equal ranks) this is FedAvg
of B and exact. Client i downloads the first r_i columns of the dense aggregate; under
LoRI-S the entries outside its own mask stay frozen at the received values. Scaling: s
from run-config ``scaling``; exactness in DeltaW needs equal s_i (``constant``).
Up per client per layer: LoRI-D d_out r_i floats; LoRI-S (1 - s) d_out r_i + d_out r_i
/ 32. Down: d_out r_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import ClientAdapter
from ..aggregation import masked_average, truncate_rank
from ..errors import require
from ..models import BaseModel
from ..types import Arrays, LayerShapes
from .base import Method, MethodOptions, Paper, Participant
from .lora_factors import freeze_seeded_a, initial_lora, padded_rank
from .registry import register_method
from .wire import DENSE, MaskedValues, UploadFormat

B = "lora_B"
#: Client bookkeeping: the mask of each module (uint8, 1 = trained).
MASK_STATE = "mask."


@dataclass(frozen=True)
class LoRIOptions(MethodOptions):
    lori_sparsity: float = field(
        default=0.9,
        metadata={
            "help": "share s of B's entries masked out (LoRI-S); 0 trains B densely (LoRI-D)"
        },
    )
    lori_calibration_rounds: int = field(
        default=1,
        metadata={"help": "LoRI-S: dense rounds before each client fixes its mask"},
    )

    def validate(self) -> None:
        require(
            0.0 <= self.lori_sparsity < 1.0,
            "lori-sparsity",
            "must be in [0, 1): the share of B's entries masked out (0: LoRI-D)",
        )
        require(
            self.lori_calibration_rounds >= 1,
            "lori-calibration-rounds",
            "must be >= 1 (dense rounds before the masks are fixed)",
        )


@register_method
class LoRI(Method):
    """Frozen seeded A; B averaged entry by entry over the clients whose mask keeps it."""

    name = "lori"
    paper = Paper(
        "Zhang et al.",
        "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation",
        "arXiv preprint",
        "2504.07448",
    )
    heterogeneous = True
    nonlinear_reason = None
    Options = LoRIOptions
    options: LoRIOptions
    uploads = downloads = (B,)

    @property
    def sparse(self) -> bool:
        return self.options.lori_sparsity > 0

    # ------------------------------------------------------------- server side
    def upload_format(self) -> UploadFormat:
        """LoRI-S: the values its mask keeps and the packed mask, at the mask's mean
        density; LoRI-D: dense B."""
        return MaskedValues(1 - self.options.lori_sparsity) if self.sparse else DENSE

    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        return initial_lora(layers, max(ranks), self.seed, self.downloads)  # B = 0

    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        rank, counts = padded_rank(shared), [c.num_examples for c in clients]
        result = {}
        for key, current in shared.items():
            decoded = [
                self._decode(u, key, (current.shape[0], c.rank))
                for u, c in zip(updates, clients, strict=True)
            ]
            result[key] = masked_average(
                [d[0] for d in decoded], [d[1] for d in decoded], counts, rank
            )
        return result

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        return truncate_rank(shared, client.rank)

    def dp_refusal(self) -> str | None:
        if self.sparse:
            return (
                "LoRI-S uploads each client's own mask, which the noise cannot cover; "
                "use LoRI-D (lori-sparsity=0)"
            )
        return super().dp_refusal()

    # ------------------------------------------------------------- client side
    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        return freeze_seeded_a(super().make_adapter(base, rank, dropout), self.seed)

    def install(self, adapter: ClientAdapter, arrays: Mapping[str, Any], shared_round: int) -> None:
        """A calibrated client's first training after calibration restarts from B = 0."""
        calibration = self.options.lori_calibration_rounds
        restart = (
            self._masks(adapter)
            and adapter.server_round > calibration
            and shared_round <= calibration
        )
        adapter.copy_in(
            {k: np.zeros_like(v) for k, v in arrays.items()} if restart else arrays, self.downloads
        )

    def start_round(self, adapter: ClientAdapter) -> None:
        """Train only the masked entries of B: their gradients are zeroed elsewhere."""
        tensors = adapter.tensors()
        for m, mask in self._masks(adapter).items():
            kept = mask.to(dtype=tensors[f"{m}.{B}"].dtype, device=tensors[f"{m}.{B}"].device)
            tensors[f"{m}.{B}"].register_hook(lambda grad, kept=kept: grad * kept)

    def upload(self, adapter: ClientAdapter) -> Arrays:
        """LoRI-S: fix the mask after calibration; upload the masked values."""
        upload = super().upload(adapter)
        if not self.sparse:
            return upload
        masks = self._masks(adapter)
        if not masks and adapter.server_round >= self.options.lori_calibration_rounds:
            masks = self._calibrate(adapter)
            adapter.state.update({MASK_STATE + m: mask for m, mask in masks.items()})
            masks = {}  # this round's upload is still dense
        return MaskedValues.encode(
            upload, {f"{m}.{B}": mask.numpy().astype(bool) for m, mask in masks.items()}
        )

    def _calibrate(self, adapter: ClientAdapter) -> dict[str, torch.Tensor]:
        """The largest-magnitude (1 - s) share of B's entries over all layers together."""
        tensors = adapter.tensors()
        weights = {m: tensors[f"{m}.{B}"].detach().abs().cpu() for m in adapter.targets}
        flat = torch.cat([w.ravel() for w in weights.values()])
        keep = max(1, round((1 - self.options.lori_sparsity) * flat.numel()))
        chosen = torch.zeros_like(flat, dtype=torch.uint8)
        chosen[torch.topk(flat, keep).indices] = 1
        masks, offset = {}, 0
        for m, w in weights.items():
            masks[m] = chosen[offset : offset + w.numel()].reshape(w.shape)
            offset += w.numel()
        return masks

    def _masks(self, adapter: ClientAdapter) -> dict[str, torch.Tensor]:
        return {
            k[len(MASK_STATE) :]: v for k, v in adapter.state.items() if k.startswith(MASK_STATE)
        }

    def _decode(
        self, update: Arrays, key: str, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(dense B_i, mask_i) of factor ``key`` from an upload."""
        if not self.sparse:
            return update[key], np.ones(update[key].shape, bool)
        return MaskedValues.decode(update, key, shape)
