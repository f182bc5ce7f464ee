"""The private state stores (``fedalora.state`` on disk, the ClientApp's in the node's
memory): the state before each round kept, the rest pruned, a failed write harmless."""

from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from clients import client_app
from fedalora import state


def test_an_interrupted_state_write_keeps_the_previous_state(tmp_path, monkeypatch):
    store = state.DiskStateStore(tmp_path, 0)
    store.save(1, {"x.A": torch.ones(2, 2)})

    def crash(tensors, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(state, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(2, {"x.A": torch.zeros(2, 2)})
    private, tag = store.load(2)
    assert tag == 1 and torch.equal(private["x.A"], torch.ones(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["client-0.round-1.safetensors"]


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_state_stores_keep_the_state_before_each_round(tmp_path, backend):
    store = (
        client_app.MemoryStateStore(RecordDict(), 0)
        if backend == "memory"
        else state.DiskStateStore(tmp_path, 3)
    )
    assert store.load(5) == (None, 0)
    for server_round in (1, 2, 3):
        store.save(server_round, {"x.A": torch.full((2,), float(server_round))})
    assert store.tags() == [2, 3]  # the newest and the one a rerun of round 3 starts from
    private, tag = store.load(2)  # training round 3 again (a retry or a resume)
    assert tag == 2 and torch.equal(private["x.A"], torch.full((2,), 2.0))
    store.save(2, {"x.A": torch.zeros(2)})  # a resumed run redoes round 2: later tags go
    assert store.tags() == [2]
