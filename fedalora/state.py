"""A client's private state, kept by round so that a retried or resumed round starts
from exactly the state it started from the first time.

Each saved state is tagged with the server round that produced it. Training in round
t starts from the newest state tagged below t; evaluating round t from the newest
tagged t or below. A store keeps the state it just saved and the newest one below it,
and drops tags above (left by an abandoned, later-resumed run). Two backends:

- ``DiskStateStore`` (``state-store=disk``): ``<state-dir>/client-<id>.round-<t>.safetensors``
  on the node's own disk, written atomically (temp file, then rename), so a crash
  mid-write leaves the previous state intact and a restarted node continues with it.
- ``MemoryStateStore`` (``state-store=memory``, in ``clients/client_app.py`` since it
  holds Flower records): the node's ``context.state``; lost when the node process ends.
"""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


class PrivateStateStore(ABC):
    """Round-tagged private tensors of one client."""

    def load(self, up_to_round: int) -> tuple[Tensors | None, int]:
        """The newest state tagged ``<= up_to_round`` and its tag; (None, 0) if none."""
        tags = [t for t in self.tags() if t <= up_to_round]
        if not tags:
            return None, 0
        return self._read(max(tags)), max(tags)

    def save(self, server_round: int, state: Tensors) -> None:
        """Store ``state`` under ``server_round``; keep only it and the newest tag below."""
        self._write(server_round, {k: v.detach().to("cpu").contiguous() for k, v in state.items()})
        below = [t for t in self.tags() if t < server_round]
        keep = {server_round, max(below)} if below else {server_round}
        for tag in set(self.tags()) - keep:
            self._delete(tag)

    @abstractmethod
    def tags(self) -> list[int]: ...

    @abstractmethod
    def _read(self, tag: int) -> Tensors: ...

    @abstractmethod
    def _write(self, tag: int, state: Tensors) -> None: ...

    @abstractmethod
    def _delete(self, tag: int) -> None: ...


class DiskStateStore(PrivateStateStore):
    """Safetensors files ``client-<partition_id>.round-<t>.safetensors`` in ``state_dir``."""

    def __init__(self, state_dir: str | Path, partition_id: int) -> None:
        self.dir = Path(state_dir).expanduser()
        self.prefix = f"client-{partition_id}.round-"
        self._pattern = re.compile(re.escape(self.prefix) + r"(\d+)\.safetensors")

    def path(self, tag: int) -> Path:
        return self.dir / f"{self.prefix}{tag}.safetensors"

    def tags(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.dir.iterdir() if (m := self._pattern.fullmatch(p.name))
        )

    def _read(self, tag: int) -> Tensors:
        return load_file(str(self.path(tag)))

    def _write(self, tag: int, state: Tensors) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{self.prefix}", suffix=".tmp")
        os.close(handle)
        try:
            save_file(state, tmp)
            Path(tmp).replace(self.path(tag))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _delete(self, tag: int) -> None:
        self.path(tag).unlink(missing_ok=True)
