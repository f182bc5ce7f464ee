"""Beyond one simulated machine: certificates and node keys as Flower reads them, the
allocator of the processes a launch starts, and a simulation over a two-node Ray cluster
(the deployment with TLS and node authentication runs in ``test_rejoin.py``, with a
SuperNode killed and rejoining)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedalora.launch import make_certificates, make_node_key, ray_cluster
from fedalora.launch.deploy import LocalDeployment
from fedalora.launch.processes import allocator_env, runtime_env
from fedalora.launch.simulate import run_simulation
from fedalora.outputs import read_jsonl

APP = Path(__file__).resolve().parents[1]
TINY = (
    "strategy='fedalora-hetero' num-hidden-layers=2 local-steps=3 "
    "batch-size=8 max-length=32 intermediate-rank=4 state-store='disk' "
    "export-adapters=false"
)
pytestmark = pytest.mark.slow


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


def _runs_on_jemalloc(allocator: str) -> bool:
    """Whether a process started in a launch's environment for ``allocator`` maps jemalloc."""
    check = "import sys; sys.exit(0 if 'libjemalloc' in open('/proc/self/maps').read() else 3)"
    env = runtime_env(allocator)
    code = subprocess.run([sys.executable, "-c", check], env=env, check=False)
    assert code.returncode in (0, 3)
    return code.returncode == 0


def test_a_launch_runs_its_processes_on_the_allocator_chosen(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    jemalloc = allocator_env("jemalloc")
    assert Path(jemalloc["LD_PRELOAD"]).is_file() and jemalloc["RAY_LD_PRELOAD_ON_WORKERS"] == "1"
    assert _runs_on_jemalloc("jemalloc") and not _runs_on_jemalloc("system")
    assert allocator_env("system") == {}
    with pytest.raises(ValueError, match="allocator 'tcmalloc': choose one of system, jemalloc"):
        allocator_env("tcmalloc")
    monkeypatch.setenv("LD_PRELOAD", "/opt/own/libfoo.so")  # the user's own stays preloaded
    assert allocator_env("jemalloc")["LD_PRELOAD"] == f"{jemalloc['LD_PRELOAD']}:/opt/own/libfoo.so"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no Ray here
    with pytest.raises(ValueError, match="Ray is not installed here"):
        allocator_env("jemalloc")


def test_insecure_mode_warns(tmp_path):
    with pytest.warns(UserWarning, match="insecure mode: no TLS"):
        LocalDeployment(tmp_path, [{"partition-id": 0, "num-partitions": 1}], secure=False)


def test_simulation_runs_across_a_two_node_ray_cluster(tmp_path):
    """A method of one's own (``tests.ema_method``, imported by its path in Ray's workers)
    on a Ray cluster of two nodes, one client actor on each at a time; its four clients
    hosted as cohorts by two Flower nodes; the cluster's workers on jemalloc."""
    import ray
    from ray._common.utils import get_ray_address_file
    from ray._private import state

    address_file = Path(get_ray_address_file(None))  # what a plain ray.init() would join
    before = address_file.read_text() if address_file.exists() else None
    ours = set()

    def maps_jemalloc() -> bool:  # in a Ray worker (a nested function travels by value)
        return "libjemalloc" in Path("/proc/self/maps").read_text()

    with ray_cluster(num_cpus=1, worker_nodes=1, allocator="jemalloc") as address:
        run_dir = run_simulation(
            APP,
            "two-nodes",
            num_supernodes=2,
            num_cpus=1,
            run_config=(
                "strategy='tests.ema_method:EmaBLoRA' ranks='8,4,2,2' num-server-rounds=2 "
                "num-clients=4 "
                "num-hidden-layers=2 local-steps=3 batch-size=8 max-length=32 "
                "test-fraction=0.05 export-adapters=false"
            ),
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
            worker_on_jemalloc = ray.get(ray.remote(maps_jemalloc).remote())
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
    assert worker_on_jemalloc  # the cluster's workers run on the allocator it was given
    # one client actor per 1-CPU Ray node: the clients ran on both nodes
    assert {a["Address"]["NodeID"] for a in actors} == nodes
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {r["client"] for r in rows} == {0, 1, 2, 3} and max(r["round"] for r in rows) == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-clients"] == 4 and len(config["clients"]) == 4
    assert config["strategy"] == "tests.ema_method:EmaBLoRA"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
