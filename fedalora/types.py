"""The array and tensor mappings that every layer of the project passes around.

Keys are ``<module>.<tensor>``: the adapted module's full name in the model and the
adapter tensor's own name (``lora_A``, ``lora_B`` for PEFT LoRA; ``A``, ``M``, ``B1``,
``B2``, ``B0`` for Fed-ALoRA's decomposition; whatever a method declares).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

#: Named numpy arrays: what crosses the network and what aggregation rules take.
Arrays = dict[str, np.ndarray]
#: Named array shapes: what a client of a given rank uploads.
Shapes = dict[str, tuple[int, ...]]
#: Named torch tensors: a client's private state.
Tensors = dict[str, torch.Tensor]
#: (d_out, d_in) of every adapted layer, by module name.
LayerShapes = Mapping[str, tuple[int, int]]


def module_of(key: str) -> str:
    """The module of a ``<module>.<tensor>`` key (module names hold dots themselves)."""
    return key.rpartition(".")[0]


def tensor_of(key: str) -> str:
    """The tensor name of a ``<module>.<tensor>`` key."""
    return key.rpartition(".")[2]
