"""A method with server-side state, written outside the package (``tests/momentum_method.py``,
FedAvgM on B): its velocity is checkpointed beside the shared state, never sent, and a
run resumed from a checkpoint ends bit for bit where the uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedalora.checkpoint import load_checkpoint
from fedalora.outputs import read_jsonl

from .momentum_method import momentum_step

APP = Path(__file__).resolve().parents[1]
RUN = (
    "strategy='tests.momentum_method:MomentumBLoRA' ranks='8,4,2' "
    "num-hidden-layers=2 local-steps=3 batch-size=8 max-length=32 test-fraction=0.05 "
    "state-store='disk' export-adapters=false fraction-evaluate=0 final-evaluation=false"
)


def test_the_momentum_rule_moves_by_the_velocity():
    shared, velocity, mean = {"b": np.array([1.0])}, {"b": np.array([2.0])}, {"b": np.array([4.0])}
    moved, new_velocity = momentum_step(shared, velocity, mean, 0.5)
    assert new_velocity["b"][0] == 0.5 * 2.0 + (4.0 - 1.0) and moved["b"][0] == 1.0 + 4.0


@pytest.mark.slow
def test_a_method_with_server_state_resumes_bit_for_bit(tmp_path):
    from server.in_process import run_in_process

    def run(name: str, extra: str) -> Path:
        return run_in_process(
            APP, name, num_supernodes=3, output_dir=tmp_path, run_config=f"{RUN} {extra}"
        )

    whole = run("whole", "num-server-rounds=2")
    run("parts", "num-server-rounds=1")
    checkpoint = load_checkpoint(tmp_path / "parts")
    assert checkpoint is not None and checkpoint.server_round == 1
    velocity, shared = checkpoint.server_state, checkpoint.shared
    assert velocity.keys() == shared.keys() and all(k.endswith(".lora_B") for k in velocity)
    assert any(np.any(v != 0) for v in velocity.values())
    assert all(np.array_equal(velocity[k], shared[k]) for k in shared)  # from B = 0: B = v
    resumed = run("parts", "num-server-rounds=2 resume=true")

    final, expected = (load_file(str(d / "shared_state.safetensors")) for d in (resumed, whole))
    assert final.keys() == expected.keys() == shared.keys()  # the velocity stays on the server
    assert all(np.array_equal(final[k], expected[k]) for k in expected)
    state_after = load_checkpoint(resumed).server_state
    state_whole = load_checkpoint(whole).server_state
    assert all(np.array_equal(state_after[k], state_whole[k]) for k in state_whole)
    scores = [
        {(r["round"], r["client"], r["phase"]): r["loss"] for r in read_jsonl(d / "metrics.jsonl")}
        for d in (resumed, whole)
    ]
    assert scores[0] == scores[1] and max(r for r, _, _ in scores[0]) == 2
    down = {r["bytes_down"] for r in read_jsonl(whole / "metrics.jsonl") if r["client"] == 2}
    modules = len(expected)
    assert down <= {0, 4 * 384 * 2 * modules}  # rank 2's B only: no velocity in a message
