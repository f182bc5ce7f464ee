"""Attach an adapter to a model and split its state into shared and private parts.

Two adapters, one interface (``ClientAdapter``):
- ``LoRAAdapter``: PEFT LoRA at the client's rank; the strategy's ``SharingSpec``
  says which of ``<module>.lora_A`` / ``<module>.lora_B`` go up, come down or stay
  (Fed-ALoRA: B moves, A stays; FedIT: both move; FedSA-LoRA: A moves, B stays; ...).
- ``DecomposedAdapter``: ``DecomposedLoRALinear`` layers (heterogeneous Fed-ALoRA):
  uploads ``<module>.B2`` and ``<module>.B1``, downloads ``<module>.B0``;
  A and M stay on the client.
Newly initialised head modules (a classifier) are trained and kept on the client too.
Both export a standard PEFT LoRA adapter with ``export_peft_adapter``.

Private state keys: LoRA factors as above; ``head.*`` (the local head), ``merged.*``
and ``state.*`` (client bookkeeping) are kept even when private factors restart.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..sharing import SharingSpec, seeded_lora_a
from .decomposed import DecomposedLoRALinear

Arrays = dict[str, np.ndarray]
Tensors = dict[str, torch.Tensor]


#: Private-state key prefixes that are not LoRA factors (kept when factors restart).
KEPT_PREFIXES = ("head.", "merged.", "state.")


class ClientAdapter(ABC):
    """A client's trainable copy of the base model with a rank-``rank`` adapter."""

    def __init__(self, base_model: nn.Module, targets: list[str], head_modules: list[str],
                 rank: int, scale: float, dropout: float) -> None:
        self.targets, self.head_modules = targets, head_modules
        self.rank, self.scale = rank, scale
        self.model = self._attach(share_frozen_weights(base_model, head_modules), dropout)
        for param in self._head_parameters().values():
            param.requires_grad_(True)

    # ------------------------------------------------------------ per adapter
    @abstractmethod
    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        """Insert the adapter layers into ``model`` and freeze everything else."""

    @abstractmethod
    def shared_state(self) -> Arrays:
        """What the client uploads after local training."""

    @abstractmethod
    def load_shared(self, arrays: Mapping[str, np.ndarray], shared_round: int = 0) -> None:
        """Install what the server sent; ``shared_round`` is the round that produced it."""

    @abstractmethod
    def _private_factors(self) -> Tensors:
        """The adapter's own client-only tensors (A and, if any, M, B1)."""

    @abstractmethod
    def peft_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per target module, PEFT's (lora_A, lora_B) with the scale folded into B."""

    def start_round(self) -> None:  # noqa: B027 - a hook; most adapters need no reset
        """Reset what must restart every round (nothing, unless overridden)."""

    # ------------------------------------------------------------------ shared
    @property
    def inner_model(self) -> nn.Module:
        """The transformers model (inside any PEFT wrapper)."""
        return self.model

    def private_state(self) -> Tensors:
        """Everything that stays on the client between rounds (detached copies)."""
        state = {k: v.detach().clone() for k, v in self._private_factors().items()}
        state.update({f"head.{k}": v.detach().clone() for k, v in self._head_parameters().items()})
        return state

    def load_private(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Restore private tensors; ``strict=False`` allows a subset (e.g. the head only)."""
        own = self._private_factors()
        own.update({f"head.{k}": v for k, v in self._head_parameters().items()})
        unknown, missing = set(state) - set(own), set(own) - set(state)
        if unknown or (strict and missing):
            raise KeyError(f"private state does not fit this adapter: unknown "
                           f"{sorted(unknown)[:3]}, missing {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                if value.shape != own[key].shape:
                    raise ValueError(f"private '{key}' has shape {tuple(value.shape)}, "
                                     f"expected {tuple(own[key].shape)}")
                own[key].copy_(value)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _head_parameters(self) -> dict[str, nn.Parameter]:
        inner = self.inner_model
        return {f"{name}.{pname}": p for name in self.head_modules
                for pname, p in inner.get_submodule(name).named_parameters()}


class LoRAAdapter(ClientAdapter):
    """PEFT LoRA at the client's rank; ``sharing`` says which factors move and stay.

    Keys are ``<module>.lora_A`` (r x d_in) and ``<module>.lora_B`` (d_out x r), PEFT's
    layout. ``peft_scaling`` holds the LoraConfig fields that give PEFT's scale s
    (``lora_alpha``, ``use_rslora``). FLoRA's merged update is kept per module as
    ``merged.<module>`` with the round it reached in ``state.merged-round``.
    """

    def __init__(self, base_model: nn.Module, targets: list[str], head_modules: list[str],
                 rank: int, scale: float, dropout: float, sharing: SharingSpec,
                 peft_scaling: Mapping[str, object], seed: int) -> None:
        self.sharing, self.peft_scaling, self.seed = sharing, dict(peft_scaling), seed
        super().__init__(base_model, targets, head_modules, rank, scale, dropout)
        if sharing.merge:
            self.merged = {m: torch.zeros_like(self._lora(m).base_layer.weight)
                           for m in targets}
            self.merged_round = torch.zeros(1, dtype=torch.int64)

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        config = LoraConfig(r=self.rank, target_modules=self.targets, lora_dropout=dropout,
                            **self.peft_scaling)
        model = get_peft_model(model, config)
        if self.sharing.frozen_a:
            inner = model.get_base_model()
            with torch.no_grad():
                for m in self.targets:
                    weight = inner.get_submodule(m).lora_A["default"].weight
                    d_in = weight.shape[1]
                    weight.copy_(torch.from_numpy(seeded_lora_a(self.seed, m, self.rank, d_in)))
                    weight.requires_grad_(False)
        return model

    @property
    def inner_model(self) -> nn.Module:
        return self.model.get_base_model()

    def _lora(self, module: str) -> nn.Module:
        return self.inner_model.get_submodule(module)

    def _factor(self, module: str, factor: str) -> torch.Tensor:
        return getattr(self._lora(module), f"lora_{factor}")["default"].weight

    def shared_state(self) -> Arrays:
        return {f"{m}.lora_{f}": _to_numpy(self._factor(m, f))
                for m in self.targets for f in self.sharing.upload}

    def load_shared(self, arrays: Mapping[str, np.ndarray], shared_round: int = 0) -> None:
        if self.sharing.merge:
            self._merge(arrays, shared_round)
            return
        expected = {f"{m}.lora_{f}" for m in self.targets for f in self.sharing.download}
        if set(arrays) != expected:
            raise ValueError(f"the server's message does not fit this strategy's download: "
                           f"missing {sorted(expected - set(arrays))[:2]}, "
                           f"unknown {sorted(set(arrays) - expected)[:2]}")
        with torch.no_grad():
            for m in self.targets:
                for f in self.sharing.download:
                    value = arrays[f"{m}.lora_{f}"]
                    if self.sharing.truncate:  # padded to the largest rank: take our part
                        value = value[: self.rank] if f == "A" else value[:, : self.rank]
                    _copy_into(self._factor(m, f), value)

    def _merge(self, arrays: Mapping[str, np.ndarray], shared_round: int) -> None:
        """Add the stacked update B A of ``shared_round`` to the merged delta, once."""
        done = int(self.merged_round)
        if not arrays or shared_round <= done:
            return
        if shared_round != done + 1:
            raise ValueError(f"this client merged the update of round {done} but was sent "
                             f"round {shared_round}'s; FLoRA clients cannot skip a merge")
        for m in self.targets:
            stack_a = torch.from_numpy(np.asarray(arrays[f"{m}.stack_A"]))
            stack_b = torch.from_numpy(np.asarray(arrays[f"{m}.stack_B"]))
            self.merged[m] += (stack_b.double() @ stack_a.double()).to(self.merged[m])
        self.merged_round.fill_(shared_round)

    def tail_norm(self, keep: int) -> torch.Tensor:
        """HetLoRA's ||s B[:, keep:] A[keep:]||_F over all adapted layers (differentiable;
        from r x r Gram matrices, with a tiny floor so the gradient at zero is finite)."""
        tails = [(self._factor(m, "A")[keep:], self._factor(m, "B")[:, keep:])
                 for m in self.targets]
        total = sum(((b.T @ b) * (a @ a.T)).sum() for a, b in tails)
        return self.scale * torch.sqrt(total.clamp_min(0) + 1e-12)

    def start_round(self) -> None:
        """FLoRA: this client's frozen weights become W0 + merged delta (a private copy;
        the shared base weights are left as they are). The LoRA itself is fresh."""
        if self.sharing.merge:
            with torch.no_grad():
                for m in self.targets:
                    base_layer = self._lora(m).base_layer
                    base_layer.weight = nn.Parameter(base_layer.weight + self.merged[m],
                                                     requires_grad=False)

    def _private_factors(self) -> Tensors:
        state = {f"{m}.lora_{f}": self._factor(m, f)
                 for m in self.targets for f in self.sharing.private}
        if self.sharing.merge:
            state.update({f"merged.{m}": delta for m, delta in self.merged.items()})
            state["state.merged-round"] = self.merged_round
        return state

    def peft_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        factors = {m: (self._factor(m, "A").detach(), self.scale * self._factor(m, "B").detach())
                   for m in self.targets}
        if not self.sharing.merge:
            return factors
        exact = {}  # merged delta + current LoRA as one exact full-rank factorisation
        for m, (lora_a, lora_b) in factors.items():
            u, s, vt = torch.linalg.svd((self.merged[m] + lora_b @ lora_a).double(),
                                        full_matrices=False)
            exact[m] = (vt.to(lora_a.dtype), (u * s).to(lora_a.dtype))
        return exact


class DecomposedAdapter(ClientAdapter):
    """Fed-ALoRA's decomposition; B2, B1 go up, B0 comes down, A and M stay."""

    def __init__(self, base_model: nn.Module, targets: list[str], head_modules: list[str],
                 rank: int, scale: float, dropout: float, intermediate_rank: int) -> None:
        self.intermediate_rank = intermediate_rank
        super().__init__(base_model, targets, head_modules, rank, scale, dropout)

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        model.requires_grad_(False)
        for name in self.targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = DecomposedLoRALinear(getattr(parent, child), self.rank,
                                         self.intermediate_rank, self.scale, dropout)
            setattr(parent, child, layer)
        return model

    def _layer(self, module: str) -> DecomposedLoRALinear:
        return self.model.get_submodule(module)

    def start_round(self) -> None:
        for m in self.targets:
            self._layer(m).reset_round()

    def shared_state(self) -> Arrays:
        state: Arrays = {}
        for m in self.targets:
            state[f"{m}.B2"] = _to_numpy(self._layer(m).B2)
            state[f"{m}.B1"] = _to_numpy(self._layer(m).B1)
        return state

    def load_shared(self, arrays: Mapping[str, np.ndarray], shared_round: int = 0) -> None:
        with torch.no_grad():
            for m in self.targets:
                _copy_into(self._layer(m).B0, arrays[f"{m}.B0"])

    def _private_factors(self) -> Tensors:
        state: Tensors = {}
        for m in self.targets:
            layer = self._layer(m)
            state.update({f"{m}.A": layer.A, f"{m}.M": layer.M, f"{m}.B1": layer.B1})
        return state

    def peft_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            return {m: (self._layer(m).A.detach().clone(),
                        self.scale * self._layer(m).up_projection())
                    for m in self.targets}


def share_frozen_weights(base_model: nn.Module, head_modules: list[str]) -> nn.Module:
    """A copy of ``base_model`` whose modules are new but whose frozen parameters and
    buffers are the base model's own tensors (no copy): every client that a worker
    serves shares one set of base weights and swaps only its adapter. The new head
    (``head_modules``), which clients train, is copied."""
    head = {id(t) for name in head_modules
            for t in [*base_model.get_submodule(name).parameters(),
                      *base_model.get_submodule(name).buffers()]}
    shared = {id(t): t for t in [*base_model.parameters(), *base_model.buffers()]
              if id(t) not in head}
    return copy.deepcopy(base_model, memo=dict(shared))


def export_peft_adapter(adapter: ClientAdapter, base_model: nn.Module, path: str | Path) -> Path:
    """Write ``adapter`` as a standard PEFT LoRA adapter that loads on ``base_model``.

    lora_alpha = r makes PEFT's scale 1; the client's scale s is folded into lora_B.
    ``PeftModel.from_pretrained(base_model, path)`` then reproduces the client's outputs.
    """
    factors = adapter.peft_factors()
    rank = max(lora_a.shape[0] for lora_a, _ in factors.values())
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                        target_modules=adapter.targets,
                        modules_to_save=adapter.head_modules or None)
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for module, (lora_a, lora_b) in factors.items():
            layer = inner.get_submodule(module)
            layer.lora_A["default"].weight.zero_()[: lora_a.shape[0]].copy_(lora_a)
            layer.lora_B["default"].weight.zero_()[:, : lora_b.shape[1]].copy_(lora_b)
        head = adapter.private_state()
        for name in adapter.head_modules:
            saved = inner.get_submodule(name).modules_to_save["default"]
            for pname, param in saved.named_parameters():
                param.copy_(head[f"head.{name}.{pname}"])
    path = Path(path)
    peft_model.save_pretrained(str(path))
    return path


def load_peft_adapter(base_model: nn.Module, path: str | Path) -> PeftModel:
    """Load an exported adapter onto a copy of ``base_model`` (for checks and inference)."""
    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(path))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _copy_into(target: torch.Tensor, value: np.ndarray) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
    target.copy_(torch.as_tensor(value, dtype=target.dtype, device=target.device))
