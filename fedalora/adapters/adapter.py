"""One client's trainable model for one round, and its export as a PEFT adapter.

A ``ClientAdapter`` is the base model with adapter layers inserted into its target
modules (PEFT LoRA, or Fed-ALoRA's decomposed layer) and a new head (a classifier
the checkpoint lacks) trained on the client. It names every adapter tensor
``<module>.<tensor>``; the federated method (``fedalora.methods``) decides which of
them go up, come down and stay. Its private state is, by key prefix:

- ``<module>.<tensor>``: the adapter tensors the method keeps on the client;
- ``head.<name>``: the local head;
- ``state.<name>``: the method's own per-client bookkeeping (``ClientAdapter.state``).
"""

from __future__ import annotations

import copy
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..models import BaseModel, quantisation_states, transposed_weights
from ..training import LocalRecipe
from ..types import Arrays, Tensors

HEAD, STATE = "head.", "state."
#: The file beside an exported classifier adapter with its label map (transformers'
#: ``id2label`` and ``label2id``; PEFT's adapter_config.json takes no extra keys).
LABEL_MAP = "labels.json"
#: Per target module, PEFT's (lora_A, lora_B) with the client's scale folded into lora_B.
PeftFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ClientAdapter(ABC):
    """A client's copy of the base model with a rank-``rank`` adapter on its adapted
    layers (``base.targets``), scale ``scale`` and input dropout ``dropout``.

    The frozen base weights are the base model's own tensors (``share_frozen_weights``);
    only the adapter and the new head are the client's.
    """

    def __init__(self, base: BaseModel, rank: int, scale: float, dropout: float) -> None:
        self.targets, self.head_modules = base.targets, base.head_modules
        self.rank, self.scale = rank, scale
        #: The method's per-client bookkeeping, kept privately between rounds.
        self.state: Tensors = {}
        #: The round this model is built for (0: outside a federation's rounds).
        self.server_round = 0
        #: The shared arrays installed this round (``copy_in``), as the server sent them.
        self.installed: dict[str, np.ndarray] = {}
        self.model = self._attach(share_frozen_weights(base.model, base.head_modules), dropout)
        for param in self._head_parameters().values():
            param.requires_grad_(True)

    @abstractmethod
    def _attach(self, model: nn.Module, dropout: float) -> nn.Module:
        """Insert the adapter layers into ``model`` and freeze everything else."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, live, as ``<module>.<tensor>``."""

    @abstractmethod
    def peft_factors(self) -> PeftFactors:
        """The adapter as PEFT LoRA factors, exactly (the scale folded into lora_B)."""

    @property
    def inner_model(self) -> nn.Module:
        """The transformers model (inside any PEFT wrapper)."""
        return self.model

    def cohort_problem(self) -> str | None:
        """Why this adapter cannot share a batched pass over the frozen base with other
        clients' adapters (``fedalora.cohort``), or None: its layers' outputs are the
        shared frozen layer's plus ``output_delta``."""
        if type(self).output_delta is ClientAdapter.output_delta:
            return f"{type(self).__name__} does not define output_delta"
        return None

    @classmethod
    def pool_shared_factor(cls, adapters: Sequence[Self]) -> None:
        """Make the clients' shared up-projection one trainable Parameter per layer, so
        that ``adapters`` form the centralised reference's multi-task model
        (``fedalora.centralised``); each keeps its own A."""
        raise NotImplementedError(f"{cls.__name__} cannot pool clients into one model")

    def output_delta(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to target ``module``'s output for the rows ``x``:
        the layer's output minus the shared frozen layer's (what a cohort needs)."""
        raise NotImplementedError(self.cohort_problem())

    def output_terms(self, module: str, x: torch.Tensor) -> list[torch.Tensor]:
        """``output_delta`` as the terms the layer alone adds to the frozen output, in its
        order: a cohort adds them in that order, so that its rows round as they do for
        the client alone."""
        return [self.output_delta(module, x)]

    def arrays(self, names: Iterable[str]) -> Arrays:
        """The tensors ``<module>.<name>`` of every target, as float32 numpy copies."""
        tensors = self.tensors()
        return {f"{m}.{n}": _to_numpy(tensors[f"{m}.{n}"]) for m in self.targets for n in names}

    def copy_in(self, arrays: Mapping[str, np.ndarray], names: Iterable[str]) -> None:
        """Overwrite the tensors ``<module>.<name>`` of every target with ``arrays``,
        which must hold exactly those keys with exactly their shapes."""
        expected = {f"{m}.{n}" for m in self.targets for n in names}
        if set(arrays) != expected:
            raise ValueError(
                f"the server's message does not fit this method's download: "
                f"missing {sorted(expected - set(arrays))[:2]}, "
                f"unknown {sorted(set(arrays) - expected)[:2]}"
            )
        tensors = self.tensors()
        with torch.no_grad():
            for key, value in arrays.items():
                _copy_into(tensors[key], value)
        self.installed.update(arrays)

    def private_state(self, kept: Iterable[str]) -> Tensors:
        """What stays on the client between rounds (detached copies): the adapter
        tensors named in ``kept``, the head and the method's bookkeeping."""
        state = {key: t.detach().clone() for key, t in self._kept(kept).items()}
        state.update({HEAD + k: v.detach().clone() for k, v in self._head_parameters().items()})
        state.update({STATE + k: v.detach().clone() for k, v in self.state.items()})
        return state

    def load_private(
        self, private: Mapping[str, torch.Tensor], kept: Iterable[str], strict: bool = True
    ) -> None:
        """Restore a private state; ``strict=False`` allows a subset (the head only)."""
        own = self._kept(kept)
        own.update({HEAD + k: v for k, v in self._head_parameters().items()})
        restored = {k: v for k, v in private.items() if not k.startswith(STATE)}
        unknown, missing = set(restored) - set(own), set(own) - set(restored)
        if unknown or (strict and missing):
            raise KeyError(
                f"private state does not fit this adapter: unknown "
                f"{sorted(unknown)[:3]}, missing {sorted(missing)[:3]}"
            )
        with torch.no_grad():
            for key, value in restored.items():
                if value.shape != own[key].shape:
                    raise ValueError(
                        f"private '{key}' has shape {tuple(value.shape)}, "
                        f"expected {tuple(own[key].shape)}"
                    )
                own[key].copy_(value)
        self.state.update(
            {k[len(STATE) :]: v.clone() for k, v in private.items() if k.startswith(STATE)}
        )

    def _kept(self, kept: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``<module>.<name>`` of every target for the names in ``kept``; a
        tensor that several modules share (one bank for many layers) counts once, under
        its first module."""
        tensors, seen, chosen = self.tensors(), set(), {}
        for m in self.targets:
            for n in kept:
                tensor = tensors[f"{m}.{n}"]
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    chosen[f"{m}.{n}"] = tensor
        return chosen

    def optimiser(
        self, recipe: LocalRecipe, steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser of a round of ``steps`` steps over the trainable parameters."""
        return recipe.optimiser(self.trainable_parameters(), steps)

    def export_fields(self) -> dict[str, Any]:
        """``LoraConfig`` fields the exported adapter needs beyond plain LoRA."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _head_parameters(self) -> dict[str, nn.Parameter]:
        inner = self.inner_model
        return {
            f"{name}.{pname}": p
            for name in self.head_modules
            for pname, p in inner.get_submodule(name).named_parameters()
        }


def lora_a_init_(weight: torch.Tensor) -> None:
    """PEFT's LoRA-A init (Kaiming-uniform, a = sqrt(5)) in place, drawn from the CPU's
    random stream whatever ``weight``'s device, so a seed gives the same factors on a
    GPU as on the CPU."""
    drawn = torch.empty(weight.shape, dtype=weight.dtype)
    nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
    with torch.no_grad():
        weight.copy_(drawn)


def method_state(private: Mapping[str, torch.Tensor] | None) -> Tensors:
    """The method's bookkeeping inside a private state (``state.<name>`` -> ``<name>``)."""
    return {k[len(STATE) :]: v for k, v in (private or {}).items() if k.startswith(STATE)}


def share_frozen_weights(base_model: nn.Module, head_modules: list[str]) -> nn.Module:
    """A copy of ``base_model`` whose modules are new but whose frozen parameters and
    buffers (and a quantised weight's bitsandbytes state) are the base model's own (no
    copy): every client that a worker serves shares one set of base weights and swaps
    only its adapter. The new head (``head_modules``), which clients train, is copied."""
    head = {
        id(t)
        for name in head_modules
        for t in [
            *base_model.get_submodule(name).parameters(),
            *base_model.get_submodule(name).buffers(),
        ]
    }
    shared: dict[int, Any] = {
        id(t): t for t in [*base_model.parameters(), *base_model.buffers()] if id(t) not in head
    }
    shared.update({id(state): state for state in quantisation_states(base_model)})
    return copy.deepcopy(base_model, memo=shared)


def export_peft_adapter(
    factors: PeftFactors,
    adapter: ClientAdapter,
    base_model: nn.Module,
    path: str | Path,
    labels: Sequence[str] = (),
) -> Path:
    """Write ``factors`` and ``adapter``'s head as a standard PEFT LoRA adapter that loads
    on ``base_model``, and a classifier's class names (``labels``, in label-id order) as
    ``labels.json`` beside it.

    lora_alpha = r makes PEFT's scale 1; the client's scale is folded into lora_B, so
    ``PeftModel.from_pretrained(base_model, path)`` reproduces the client's outputs (on
    the quantised base the client trained on, and the unquantised one).
    """
    rank = max(lora_a.shape[0] for lora_a, _ in factors.values())
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=adapter.targets,
        modules_to_save=adapter.head_modules or None,
        fan_in_fan_out=transposed_weights(base_model, adapter.targets),
        **adapter.export_fields(),
    )
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    inner = peft_model.get_base_model()
    tensors = adapter.tensors()
    with torch.no_grad():
        for module, (lora_a, lora_b) in factors.items():
            layer: Any = inner.get_submodule(module)  # PEFT's LoRA layer
            layer.lora_A["default"].weight.zero_()[: lora_a.shape[0]].copy_(lora_a)
            layer.lora_B["default"].weight.zero_()[:, : lora_b.shape[1]].copy_(lora_b)
            if f"{module}.lora_magnitude" in tensors:  # DoRA: the same W + B A, the same m
                layer.lora_magnitude_vector["default"].weight.copy_(
                    tensors[f"{module}.lora_magnitude"]
                )
        head = adapter._head_parameters()
        for name in adapter.head_modules:
            wrapper: Any = inner.get_submodule(name)  # PEFT's ModulesToSaveWrapper
            saved = wrapper.modules_to_save["default"]
            for pname, param in saved.named_parameters():
                param.copy_(head[f"{name}.{pname}"])
    path = Path(path)
    peft_model.save_pretrained(str(path))
    if labels:
        (path / LABEL_MAP).write_text(json.dumps(label_map(labels), indent=2), encoding="utf-8")
    return path


def label_map(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """transformers' ``id2label`` and ``label2id`` of class names in label-id order."""
    return {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def load_peft_adapter(base_model: nn.Module, path: str | Path) -> PeftModel:
    """Load an exported adapter onto a copy of ``base_model`` (for checks and inference)."""
    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(path))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _copy_into(target: torch.Tensor, value: np.ndarray) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
    target.copy_(torch.as_tensor(value, dtype=target.dtype, device=target.device))
