"""A client's private state on its own disk (``state-store=disk``).

One safetensors file per client, ``<state-dir>/client-<partition-id>.safetensors``,
replaced atomically (written next to it, then renamed), so a crash mid-write leaves
the previous round's state intact. Only the clients active in a round hold their
state in memory, whatever the size of the federation.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


def private_state_path(state_dir: str | Path, partition_id: int) -> Path:
    """The file that holds client ``partition_id``'s private state."""
    return Path(state_dir).expanduser() / f"client-{partition_id}.safetensors"


def save_private_state(path: str | Path, state: Tensors) -> None:
    """Write ``state`` to ``path`` atomically (CPU, contiguous copies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_private_state(path: str | Path) -> Tensors | None:
    """The state saved at ``path``, or None when the client has none yet."""
    path = Path(path)
    return load_file(str(path)) if path.exists() else None
