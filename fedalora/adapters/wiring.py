"""Attach an adapter to a model and split its state into shared and private parts.

Two adapters, one interface (``ClientAdapter``):
- ``LoRAAdapter``: PEFT LoRA at the client's rank (homogeneous Fed-ALoRA):
  uploads and downloads ``<module>.lora_B``; ``lora_A`` stays on the client.
- ``DecomposedAdapter``: ``DecomposedLoRALinear`` layers (heterogeneous Fed-ALoRA):
  uploads ``<module>.B2`` and ``<module>.B1``, downloads ``<module>.B0``;
  A and M stay on the client.
Newly initialised head modules (a classifier) are trained and kept on the client too.
Both export a standard PEFT LoRA adapter with ``export_peft_adapter``.
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

from .decomposed import DecomposedLoRALinear

Arrays = dict[str, np.ndarray]
Tensors = dict[str, torch.Tensor]


class ClientAdapter(ABC):
    """A client's trainable copy of the base model with a rank-``rank`` adapter."""

    def __init__(self, base_model: nn.Module, targets: list[str], head_modules: list[str],
                 rank: int, scale: float, dropout: float) -> None:
        self.targets, self.head_modules = targets, head_modules
        self.rank, self.scale = rank, scale
        self.model = self._attach(copy.deepcopy(base_model), dropout)
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
    def load_shared(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Install what the server broadcast."""

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
    """PEFT LoRA; B is shared, A is private. lora_alpha = s * r gives PEFT scale s."""

    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        config = LoraConfig(r=self.rank, lora_alpha=self.scale * self.rank,
                            target_modules=self.targets, lora_dropout=dropout)
        return get_peft_model(model, config)

    @property
    def inner_model(self) -> nn.Module:
        return self.model.get_base_model()

    def _lora(self, module: str) -> nn.Module:
        return self.inner_model.get_submodule(module)

    def shared_state(self) -> Arrays:
        return {f"{m}.lora_B": _to_numpy(self._lora(m).lora_B["default"].weight)
                for m in self.targets}

    def load_shared(self, arrays: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for m in self.targets:
                _copy_into(self._lora(m).lora_B["default"].weight, arrays[f"{m}.lora_B"])

    def _private_factors(self) -> Tensors:
        return {f"{m}.lora_A": self._lora(m).lora_A["default"].weight for m in self.targets}

    def peft_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {m: (self._lora(m).lora_A["default"].weight.detach(),
                    self.scale * self._lora(m).lora_B["default"].weight.detach())
                for m in self.targets}


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

    def load_shared(self, arrays: Mapping[str, np.ndarray]) -> None:
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


def export_peft_adapter(adapter: ClientAdapter, base_model: nn.Module, path: str | Path) -> Path:
    """Write ``adapter`` as a standard PEFT LoRA adapter that loads on ``base_model``.

    lora_alpha = r makes PEFT's scale 1; the client's scale s is folded into lora_B.
    ``PeftModel.from_pretrained(base_model, path)`` then reproduces the client's outputs.
    """
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.rank, lora_dropout=0.0,
                        target_modules=adapter.targets,
                        modules_to_save=adapter.head_modules or None)
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for module, (lora_a, lora_b) in adapter.peft_factors().items():
            layer = inner.get_submodule(module)
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
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
