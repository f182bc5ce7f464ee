"""Beyond one simulated machine: real SuperLink and SuperNode processes with TLS and
node authentication on loopback, and a simulation over a two-node Ray cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from fedalora.deploy import LocalDeployment, make_certificates, make_node_key
from fedalora.outputs import read_jsonl
from fedalora.simulate import ray_cluster, run_simulation

APP = Path(__file__).resolve().parents[1]
TINY = (
    "strategy='fedalora-hetero' num-hidden-layers=2 local-steps=3 "
    "batch-size=8 max-length=32 intermediate-rank=4 state-store='disk' "
    "export-adapters=false"
)
pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


#: Deployed rounds without the evaluation phase: each phase is a message round of its
#: own, and what is checked here is training, private state and resume.
TRAIN_ONLY = "fraction-evaluate=0.0 final-evaluation=false"


def test_superlink_and_three_authenticated_supernodes_over_tls(tmp_path):
    nodes = [
        {"partition-id": i, "num-partitions": 3, "lora-rank": rank}
        for i, rank in enumerate([8, 4, 2])
    ]
    deployment = LocalDeployment(tmp_path, nodes)
    started: list[int] = []
    with deployment:
        started += [p.pid for p in deployment.processes.values()]
        assert "--enable-supernode-auth" in deployment.processes["superlink"].args
        first = deployment.run(
            APP,
            "deployed",
            tmp_path / "server",
            f"{TINY} ranks='8,4,2' min-nodes=3 num-server-rounds=1 {TRAIN_ONLY}",
        )
        b0_after_1 = load_file(str(first / "shared_state.safetensors"))
        deployment.stop_node(0)  # a restarted SuperNode: a new process, nothing in memory
        deployment.start_node(0)
        started.append(deployment.processes["node-0"].pid)
        resumed = deployment.run(
            APP,
            "deployed",
            tmp_path / "server",
            f"{TINY} ranks='8,4,2' min-nodes=3 num-server-rounds=2 resume=true {TRAIN_ONLY}",
        )
        started += [
            child.pid
            for p in deployment.processes.values()
            for child in psutil.Process(p.pid).children(recursive=True)
        ]
    assert not any(_alive(pid) for pid in started)  # every process and its children stopped

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_after_round"] == 1
    train = [r for r in read_jsonl(resumed / "metrics.jsonl") if r["phase"] == "train"]
    assert sorted((r["round"], r["client"], r["rank"]) for r in train) == [
        (t, c, rank) for t in (1, 2) for c, rank in enumerate([8, 4, 2])
    ]
    # round 2 starts, on every node and on the restarted one too, from the private
    # state each node saved on its own disk in round 1
    assert {r["client"]: r["private_state_round"] for r in train if r["round"] == 2} == {
        0: 1,
        1: 1,
        2: 1,
    }
    assert [r["round"] for r in read_jsonl(resumed / "rounds.jsonl")] == [1, 2]
    b0_after_2 = load_file(str(resumed / "shared_state.safetensors"))
    assert b0_after_2.keys() == b0_after_1.keys()
    assert all(k.endswith(".B0") for k in b0_after_2)
    assert not all(np.array_equal(b0_after_1[k], b0_after_2[k]) for k in b0_after_2)
    # private factors live only in each node's own state-dir, never on the server side
    for i in range(3):
        assert {p.name for p in (tmp_path / f"node-{i}").iterdir()} == {
            f"client-{i}.round-1.safetensors",
            f"client-{i}.round-2.safetensors",
        }
    server_files = [p for p in (tmp_path / "server").rglob("*") if p.is_file()]
    assert not any("private" in str(p) or "client-" in p.name for p in server_files)
    checkpoint = load_file(str(resumed / "checkpoint" / "shared-round-2.safetensors"))
    assert checkpoint.keys() == b0_after_2.keys()


def test_certificates_and_node_keys_load_as_flower_reads_them(tmp_path):
    import ssl

    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    certs = make_certificates(tmp_path, ["localhost", "127.0.0.1"])
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.certificate), str(certs.key))
    private, public = make_node_key(tmp_path / "node0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert key.public_key() == load_ssh_public_key(public.read_bytes())
    assert oct(private.stat().st_mode)[-3:] == "600" and oct(certs.key.stat().st_mode)[-3:] == "600"


def test_insecure_mode_warns(tmp_path):
    with pytest.warns(UserWarning, match="insecure mode: no TLS"):
        LocalDeployment(tmp_path, [{"partition-id": 0, "num-partitions": 1}], secure=False)


def test_simulation_runs_across_a_two_node_ray_cluster(tmp_path):
    import ray
    from ray._common.utils import get_ray_address_file
    from ray._private import state

    address_file = Path(get_ray_address_file(None))  # what a plain ray.init() would join
    before = address_file.read_text() if address_file.exists() else None
    ours = set()
    with ray_cluster(num_cpus=1, worker_nodes=1) as address:
        run_dir = run_simulation(
            APP,
            "two-nodes",
            num_supernodes=4,
            num_cpus=1,
            run_config=f"{TINY} ranks='8,4,2,2' num-server-rounds=2",
            output_dir=tmp_path,
            flwr_home=tmp_path / "flwr-home",
            timeout=600,
            log_path=tmp_path / "run.log",
            ray_address=address,
        )
        ray.init(address=address, logging_level="ERROR")
        try:
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            actors = [a for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
        finally:
            ray.shutdown()
        port = address.rsplit(":", 1)[1]
        ours = {
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if "gcs_server" in " ".join(p.info["cmdline"] or [])
            and port in " ".join(p.info["cmdline"] or [])
        }
    assert ours and not [pid for pid in ours if _running(pid)]  # its own, stopped
    assert (address_file.read_text() if address_file.exists() else None) == before
    assert len(nodes) == 2
    # one client actor per 1-CPU Ray node: the clients ran on both nodes
    assert {a["Address"]["NodeID"] for a in actors} == nodes
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {r["client"] for r in rows} == {0, 1, 2, 3} and max(r["round"] for r in rows) == 2


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
