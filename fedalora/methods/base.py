"""A federated LoRA method: everything one algorithm is, declared once, in one class.

The server half follows Flower's strategies (an initial state, the per-client
download, the aggregation as one pure function call); the client half follows PEFT's
LoRA variants (hooks that the generic client calls at fixed points of a round). A
method subclasses ``Method``, overrides what differs from plain PEFT LoRA and is
registered with ``@register_method`` (``fedalora.methods.registry``):

    server                                  client (``fedalora.client``)
    ------                                  ----------------------------
    initial_shared(layers, ranks)           client_rank(rank, state)
    initial_server_state(layers, ranks)
    download(shared, client)  ----------->  make_adapter(base, rank, dropout)
                                            load private state (``keeps``, head, state)
                                            install(adapter, arrays, shared_round)
                                            start_round(adapter)
                                            train (+ loss_penalty(adapter))
    upload_shapes(layers, rank, round) <-   upload(adapter)
    upload_format()
    applied_size(upload, rank)   (size screens)
    aggregate(shared, updates, clients)     export_factors(adapter)
    (server_step, with server state)

Under client-level DP (``fedalora.privacy``) a linear method's client (``dp_refusal``
None) sends its
``shared_delta`` (shapes ``delta_shapes``) clipped, and the server's DP-FedAvg step
replaces ``aggregate``.

A method that keeps state of its own on the server (a momentum's velocity) returns it
from ``initial_server_state`` and updates it in ``server_step``; the strategy
checkpoints it beside the shared state and never sends it.

Every array is named ``<module>.<tensor>``; ``uploads``, ``downloads`` and ``keeps``
name the adapter tensors (``tensor_shapes``) that go up, come down and stay on the
client. Everything the method needs from the run arrives in ``__init__``: its own
options (``Options``, run-config keys checked in ``MethodOptions.validate``), the
run seed and the LoRA scaling rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..adapters import ClientAdapter, LoRAAdapter, PeftFactors
from ..models import BaseModel
from ..scaling import LoRAScaling
from ..screening import update_size
from ..settings import Section
from ..types import Arrays, LayerShapes, Shapes, Tensors, tensor_of
from ..variants import MAGNITUDE, Variants
from .wire import DENSE, UploadFormat


@dataclass(frozen=True)
class Paper:
    """The publication a method implements."""

    authors: str
    title: str
    venue: str
    arxiv: str = ""

    def __str__(self) -> str:
        arxiv = f", arXiv:{self.arxiv}" if self.arxiv else ""
        return f'{self.authors}, "{self.title}", {self.venue}{arxiv}'


@dataclass(frozen=True)
class Participant:
    """What the server knows of a client: its partition, its current rank and the
    number of its training examples it claims; in ``Method.aggregate``, the weight n_i
    of p_i = n_i / sum(n) that the run's ``weights`` policy gives it (``fedalora.robust``:
    the claim, capped, or 1)."""

    partition_id: int
    rank: int
    num_examples: int


@dataclass(frozen=True)
class MethodOptions(Section):
    """A method's own run-config keys: subclass with one frozen dataclass field per key
    (``rank_decay`` is run-config ``rank-decay``), each with a default and a
    ``metadata={"help": ...}``; ``validate`` raises ConfigError naming the key."""


class Method(ABC):
    """One federated LoRA algorithm (the defaults are plain PEFT LoRA at the client's
    rank, nothing shared)."""

    #: run-config ``strategy`` value.
    name: ClassVar[str]
    #: The publication it implements (None: a reference run of this project).
    paper: ClassVar[Paper | None]
    #: Whether clients of different ranks can take part in one federation.
    heterogeneous: ClassVar[bool] = False
    #: Whether a client may upload at a lower rank than it was discovered with.
    ranks_can_shrink: ClassVar[bool] = False
    #: The method's own run-config keys.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: Adapter tensors a client uploads, installs from the server, keeps between rounds
    #: (with the tensors the run's LoRA variants add, per instance).
    uploads: tuple[str, ...] = ()
    downloads: tuple[str, ...] = ()
    keeps: tuple[str, ...] = ()
    #: The LoRA variants (run-config keys of ``fedalora.variants``) the method takes.
    accepts: ClassVar[frozenset[str]] = frozenset()
    #: Why the rule is not the shared state plus the clients' mean ``shared_delta`` (up
    #: to the weights), or None when it is: then client-level DP (``fedalora.privacy``)
    #: and robust aggregation can clip, noise or trim each client's delta and keep the
    #: method's meaning (``dp_refusal``).
    nonlinear_reason: ClassVar[str | None] = (
        "its rule is not the shared state plus a mean of per-client updates"
    )
    #: Whether the centralised reference (``fedalora.centralised``) pools the clients
    #: with this method's own adapters at one rank (their shared factor tied); the others
    #: are referenced by ALoRA's pooled model.
    pooled_reference: ClassVar[bool] = False

    def __init__(
        self,
        options: MethodOptions,
        *,
        seed: int,
        scaling: LoRAScaling,
        variants: Variants | None = None,
    ) -> None:
        self.options, self.seed, self.scaling = options, seed, scaling
        self.variants = variants or Variants()
        self.uploads = (*self.uploads, *self.variants.shared())
        self.downloads = (*self.downloads, *self.variants.shared())
        self.keeps = (*self.keeps, *self.variants.private())

    # ------------------------------------------------------------- server side
    def tensor_shapes(self, d_out: int, d_in: int, rank: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one d_out x d_in layer's adapter tensors at ``rank``, by name."""
        return {"lora_A": (rank, d_in), "lora_B": (d_out, rank), MAGNITUDE: (d_out,)}

    def upload_shapes(self, layers: LayerShapes, rank: int, server_round: int) -> Shapes:
        """Array names and shapes of the dense factors a client of ``rank`` uploads in
        ``server_round`` (what travels is ``upload_format().shapes`` of them): its
        ``uploads``, whatever the round, by default."""
        return {
            f"{m}.{name}": self.tensor_shapes(d_out, d_in, rank)[name]
            for m, (d_out, d_in) in layers.items()
            for name in self.uploads
        }

    def upload_format(self) -> UploadFormat:
        """How the upload travels (``fedalora.methods.wire``): the dense factors of
        ``upload_shapes`` as they are, by default."""
        return DENSE

    def applied_size(self, upload: Arrays, rank: int) -> tuple[float, float]:
        """(RMS entry, L2 norm) of what an upload at ``rank`` changes in the shared state,
        as the size screens measure it: the uploaded factors themselves (their average
        is the rule)."""
        return update_size(upload)

    @abstractmethod
    def initial_shared(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        """The shared state before round 1, for clients of ``ranks``."""

    @abstractmethod
    def aggregate(
        self, shared: Arrays, updates: Sequence[Arrays], clients: Sequence[Participant]
    ) -> Arrays:
        """The new shared state from the current one and the accepted updates
        (``updates[i]`` from ``clients[i]``, sorted by partition id)."""

    def initial_server_state(self, layers: LayerShapes, ranks: Sequence[int]) -> Arrays:
        """What the server keeps beside the shared state and never sends (checkpointed
        with it); none by default."""
        return {}

    def server_step(
        self,
        shared: Arrays,
        server_state: Arrays,
        updates: Sequence[Arrays],
        clients: Sequence[Participant],
    ) -> tuple[Arrays, Arrays]:
        """The new shared state and server state from the accepted updates: ``aggregate``,
        the server state unchanged, by default. A robust or DP step that replaces the
        method's rule leaves the server state as it is."""
        return self.aggregate(shared, updates, clients), server_state

    def download(self, shared: Arrays, client: Participant) -> Arrays:
        """What ``client`` receives; the shared state itself by default."""
        return shared

    def dp_refusal(self) -> str | None:
        """Why client-level DP (or robust aggregation) cannot protect this method's
        uploads, or None: ``nonlinear_reason``, or what the run's variants change."""
        if self.nonlinear_reason:
            return self.nonlinear_reason
        derived = [n for n in self.variants.client_initialised() if n in self.downloads]
        if derived:
            return (
                f"the shared LoRA-variant tensors {derived} start from values each client "
                "derives from the base, so the shared state is not where every update starts"
            )
        return None

    def delta_shapes(self, layers: LayerShapes, rank: int) -> Shapes:
        """Array names and shapes of the update a client of ``rank`` sends under DP: its
        ``downloads`` as it installs them (at its own rank)."""
        return {
            f"{m}.{name}": self.tensor_shapes(d_out, d_in, rank)[name]
            for m, (d_out, d_in) in layers.items()
            for name in self.downloads
        }

    # ------------------------------------------------------------- client side
    def client_rank(self, rank: int, state: Tensors) -> int:
        """The rank the client trains at this round, given its bookkeeping ``state``."""
        return rank

    def make_adapter(self, base: BaseModel, rank: int, dropout: float) -> ClientAdapter:
        """The client's adapter at ``rank`` on the shared base model (PEFT LoRA)."""
        return LoRAAdapter(
            base,
            rank,
            self.scaling.scale(rank),
            dropout,
            self.scaling.peft_fields(rank),
            self.variants,
        )

    def install(self, adapter: ClientAdapter, arrays: Mapping[str, Any], shared_round: int) -> None:
        """Install the server's message (produced by round ``shared_round``); before the
        first aggregation, the tensors that the LoRA variants derive from the base on
        every client (DoRA's magnitude, a principal init) keep their derived values."""
        own = self.variants.client_initialised() if shared_round == 0 else ()
        adapter.copy_in(
            {k: v for k, v in arrays.items() if tensor_of(k) not in own},
            [n for n in self.downloads if n not in own],
        )

    def start_round(self, adapter: ClientAdapter) -> None:  # noqa: B027 - a hook; most need no reset
        """Reset what restarts every round, after the private and shared state are in."""

    def loss_penalty(self, adapter: ClientAdapter) -> Callable[[], torch.Tensor] | None:
        """A term added to the local training loss, or None."""
        return None

    def upload(self, adapter: ClientAdapter) -> Arrays:
        """What the client sends after local training (called once per round, so a
        method may also update its bookkeeping ``adapter.state`` here)."""
        return adapter.arrays(self.uploads)

    def shared_delta(self, installed: Arrays, upload: Arrays) -> Arrays:
        """The client's update to the shared state (keys and shapes of ``delta_shapes``),
        from the ``downloads`` it installed and its upload: upload - installed."""
        return {k: upload[k] - installed[k] for k in installed}

    def export_factors(self, adapter: ClientAdapter) -> PeftFactors:
        """The client's personalised model as exact PEFT LoRA factors."""
        return adapter.peft_factors()
