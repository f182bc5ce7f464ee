"""Launching the Flower app: a Ray simulation on this machine or a Ray cluster
(``simulate``, ``cluster``), and a deployment of real SuperLink and SuperNode processes
with TLS and node authentication (``deploy``, ``certificates``); ``processes``,
``connection`` and ``runs`` are what both share. Flower itself is started as
processes and read only where needed, so importing this package needs no Flower.
``simulate`` and ``deploy`` are also the command lines, so the package does not import
them: ``from fedalora.launch.simulate import run_simulation``.

    python -m fedalora.launch.simulate --run-name default
    python -m fedalora.launch.deploy local --ranks 8,4,2
"""

from .certificates import Certificates, make_certificates, make_node_key
from .cluster import ray_cluster
from .runs import RunFollower, SimulationFailed, check_run_config, completed_run

__all__ = [
    "Certificates",
    "RunFollower",
    "SimulationFailed",
    "check_run_config",
    "completed_run",
    "make_certificates",
    "make_node_key",
    "ray_cluster",
]
