"""The server's per-round checkpoint, from which ``resume=true`` continues a run.

``<run-dir>/checkpoint/`` holds ``shared-round-<k>.safetensors`` (the shared state
after round k: never a client's private factors), ``server-state-round-<k>.safetensors``
(the method's own server state, e.g. a momentum; empty for most) and ``state.json`` (the round, the
round whose aggregation produced the shared state, each client's partition, rank and
example count, the run-config, the strategy's own state such as the privacy
accountant's ledger, and the RNG state). ``state.json`` is replaced last and
atomically, so a run killed at any moment leaves the previous complete checkpoint.

The server keeps no running random generator: round t's node sample is drawn from
``numpy.random.default_rng([seed, t, stream, attempt])`` and a client's batch order
and dropout from ``[seed, t, partition-id]``, so the seed and the round number are
the whole RNG state, and a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR, STATE = "checkpoint", "state.json"
#: Run-config keys that may change when a run is resumed.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "num-server-rounds",
        "round-timeout",
        "round-retries",
        "min-nodes",
        "device",
        "bf16",
        "activation-checkpointing",
        "export-adapters",
        "tracker",
        "output-dir",
    }
)


@dataclass(frozen=True)
class Checkpoint:
    server_round: int
    shared_round: int
    shared: dict[str, np.ndarray]
    clients: list[dict[str, int]]  # partition_id, rank, num_examples
    config: dict[str, Any]
    #: The strategy's own state (the privacy accountant's ledger under DP).
    strategy: dict[str, Any] = field(default_factory=dict)
    #: The method's server state (``Method.initial_server_state``), never sent.
    server_state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rng_state(self) -> dict[str, Any]:
        return {
            "seed": self.config["seed"],
            "next-round": self.server_round + 1,
            "node-sampling": "numpy default_rng([seed, round, stream, attempt])",
            "client": "[seed, round, partition-id]",
        }


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint of ``checkpoint.server_round``; returns its state.json."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    shared_name = f"shared-round-{checkpoint.server_round}.safetensors"
    server_name = f"server-state-round-{checkpoint.server_round}.safetensors"
    for name, arrays in ((shared_name, checkpoint.shared), (server_name, checkpoint.server_state)):
        tmp = folder / f".{name}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        tmp.replace(folder / name)
    state = {
        "round": checkpoint.server_round,
        "shared_round": checkpoint.shared_round,
        "shared_file": shared_name,
        "server_state_file": server_name,
        "clients": checkpoint.clients,
        "config": checkpoint.config,
        "strategy": checkpoint.strategy,
        "rng": checkpoint.rng_state,
    }
    with tempfile.NamedTemporaryFile(
        "w", dir=folder, delete=False, suffix=".tmp", encoding="utf-8"
    ) as handle:
        json.dump(state, handle, indent=2)
    Path(handle.name).replace(folder / STATE)
    for old in [*folder.glob("shared-round-*"), *folder.glob("server-state-round-*")]:
        if old.name not in (shared_name, server_name):
            old.unlink()
    return folder / STATE


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The last complete checkpoint under ``run_dir``, or None if there is none."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / STATE).exists():
        return None
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    return Checkpoint(
        server_round=int(state["round"]),
        shared_round=int(state["shared_round"]),
        shared=load_file(str(folder / state["shared_file"])),
        clients=state["clients"],
        config=state["config"],
        strategy=state.get("strategy", {}),
        server_state=load_file(str(folder / state["server_state_file"])),
    )


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Run-config keys whose value differs from the checkpoint's and may not."""
    return sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )
