"""Deploy the app as real Flower processes: TLS certificates, SuperNode keys, a SuperLink,
SuperNodes each with its own rank, data partition and private-state directory.

On the SuperLink's machine, then on each node's machine (keys and ca.crt copied there)::

    python -m fedalora.launch.deploy certs --out certs --host superlink.example.org
    python -m fedalora.launch.deploy node-key --out keys/node0        # one per SuperNode
    python -m fedalora.launch.deploy superlink --certs certs          # serves on 0.0.0.0:8000
    python -m fedalora.launch.deploy connection --superlink superlink.example.org:8000 \
        --ca certs/ca.crt >> "${FLWR_HOME:-$HOME/.flwr}/config.toml"
    flwr supernode register keys/node0.pub fedalora-deployment
    python -m fedalora.launch.deploy supernode --ca certs/ca.crt --key keys/node0 \
        --superlink superlink.example.org:8000 --partition-id 0 --num-partitions 3 \
        --lora-rank 8 --state-dir ~/fedalora-state
    # a node hosting a cohort of clients: --partition-ids 0,3,6 --num-partitions 9
    flwr run . fedalora-deployment --stream --run-config "state-store='disk'"

``local`` does all of it on loopback (a SuperLink and N SuperNodes, then one run).
TLS and SuperNode authentication are on unless ``--insecure`` is given, which warns.
``supernode`` runs flower-supernode as its child and starts it again while the
SuperLink refuses it for still holding the same node from before a crash.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..run_config import format_run_config
from .certificates import Certificates, make_certificates, make_node_key
from .connection import connection_toml, write_connection
from .processes import (
    ALLOCATORS,
    BIN,
    free_port,
    run_logged,
    runtime_env,
    stop_process_tree,
    wait_healthy,
)
from .runs import SimulationFailed, check_run_config, completed_run, refuse_run

CONNECTION = "fedalora-deployment"


INSECURE_WARNING = (
    "insecure mode: no TLS and no SuperNode authentication; anyone who can "
    "reach the SuperLink can join the federation and read every message"
)


#: How much longer than the SuperLink's hold ``supernode`` retries by default (s).
REJOIN_MARGIN = 30.0


@dataclass(frozen=True)
class Refusal:
    """A refused activation as Flower reports it: the lines flower-supernode prints
    before it exits 1 (flwr_exit in flwr/supernode/fleet_http_connection.py, the code of
    fleet_handlers.py), and how long the SuperLink keeps a dead node online (``patience``
    heartbeat intervals, ``hold`` s)."""

    markers: tuple[str, str]
    patience: int
    hold: float


@functools.cache
def refusal() -> Refusal:
    """Flower's refusal, read from Flower when first needed (importing this module
    needs no Flower)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
    from flwr.supercore.error import ApiErrorCode
    from flwr.supercore.exit import ExitCode

    return Refusal(
        (
            f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}",
            f"[code: {int(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)}]",
        ),
        HEARTBEAT_PATIENCE,
        float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL),
    )


def superlink_command(
    certs: Certificates | None, host: str, port: int, database: Path
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs`` None: insecure)."""
    security = (
        ["--insecure"]
        if certs is None
        else [
            "--ssl-ca-certfile",
            str(certs.ca),
            "--ssl-certfile",
            str(certs.certificate),
            "--ssl-keyfile",
            str(certs.key),
            "--enable-supernode-auth",
        ]
    )
    return [
        str(BIN / "flower-superlink"),
        *security,
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--database",
        str(database),
    ]


def supernode_command(
    superlink: str, ca: Path | None, key: Path | None, node_config: dict, port: int
) -> list[str]:
    """``flower-supernode`` for one client or a cohort: ``node_config`` holds partition-id
    (or partition-ids), num-partitions and optionally lora-rank, state-dir, dataset."""
    security = (
        ["--insecure"]
        if ca is None
        else ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    )
    config = format_run_config(node_config)
    return [
        str(BIN / "flower-supernode"),
        *security,
        "--superlink",
        superlink,
        "--node-config",
        config,
        "--port",
        str(port),
        "--isolation",
        "subprocess",
    ]


def supervise_supernode(
    command: list[str],
    env: Mapping[str, str],
    rejoin_timeout: float | None = None,
    retry_every: float = 3.0,
) -> int:
    """Run ``command`` (flower-supernode), its output on this stderr, and return its exit
    status; while the SuperLink refuses its activation (it still holds this node from
    before a crash), start it again every ``retry_every`` s, for at most
    ``rejoin_timeout`` s (the SuperLink's hold plus ``REJOIN_MARGIN``), then SystemExit.
    SIGTERM, SIGINT and SIGHUP go to the child."""
    refused = refusal()
    if rejoin_timeout is None:
        rejoin_timeout = refused.hold + REJOIN_MARGIN
    deadline = time.monotonic() + rejoin_timeout
    stopped = threading.Event()
    received: list[int] = []
    child: subprocess.Popen[str] | None = None

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        stopped.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        while not stopped.is_set():
            child = subprocess.Popen(
                command,
                env=dict(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            if received:  # a signal between the loop's test and the start
                child.send_signal(received[0])
            tail: collections.deque[str] = collections.deque(maxlen=50)
            reader = threading.Thread(target=_echo_lines, args=(child.stdout, tail), daemon=True)
            reader.start()
            code = child.wait()
            reader.join(timeout=2)  # its lines are in the pipe; its flower-superexec may linger
            if (
                stopped.is_set()
                or code != 1
                or not all(m in "".join(tail) for m in refused.markers)
            ):
                return code if code >= 0 else 128 - code
            if time.monotonic() + retry_every > deadline:
                raise SystemExit(
                    f"the SuperLink still refuses this SuperNode after {rejoin_timeout:.0f} s: "
                    "its key is not registered (flwr supernode register <key>.pub) or another "
                    "SuperNode with this key is running"
                )
            print(
                "the SuperLink refused this node's activation: it still holds this node from "
                "before it stopped (it keeps a dead node online for about "
                f"{refused.patience} heartbeat intervals, {refused.hold:.0f} s), or its key is not "
                f"registered; retrying in {retry_every:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            stopped.wait(retry_every)
        return 128 + received[0]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _echo_lines(lines: Iterable[str], tail: collections.deque[str]) -> None:
    for line in lines:
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line)


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes as real processes on this machine (loopback), each
    started in its own session and stopped by its pid.

    ``nodes[i]`` is node i's node-config; its private state goes to ``<root>/node-<i>``
    unless the node-config names a state-dir.
    """

    root: Path
    nodes: list[dict]
    secure: bool = True
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flwr_home = self.root / "flwr-home"
        self.env = {**runtime_env(), "FLWR_HOME": str(self.flwr_home)}
        if not self.secure:
            warnings.warn(INSECURE_WARNING, stacklevel=2)
        self.certs = make_certificates(self.root / "certs") if self.secure else None
        self.node_ports = [free_port() for _ in self.nodes]
        for i, config in enumerate(self.nodes):
            config.setdefault("state-dir", str(self.root / f"node-{i}"))
            if self.secure:
                make_node_key(self.root / "keys" / f"node{i}")
        write_connection(
            self.flwr_home, CONNECTION, self.address, self.certs.ca if self.certs else None
        )

    def start(self) -> None:
        """The SuperLink, the node registrations (secure mode), then every SuperNode."""
        self._spawn(
            "superlink",
            superlink_command(self.certs, "127.0.0.1", self.port, self.root / "superlink.db"),
        )
        context = ssl.create_default_context(cafile=str(self.certs.ca)) if self.certs else None
        scheme = "https" if self.certs else "http"
        wait_healthy(
            f"{scheme}://127.0.0.1:{self.port}", self.processes["superlink"], context=context
        )
        if self.secure:
            for i in range(len(self.nodes)):
                self._flwr(["supernode", "register", str(self._key(i)) + ".pub", CONNECTION])
        for i in range(len(self.nodes)):
            self.start_node(i)

    def start_node(self, i: int) -> None:
        """Node i as ``python -m fedalora.launch.deploy supernode`` (which waits out a refusal)."""
        security = (
            ["--ca", str(self.certs.ca), "--key", str(self._key(i))]
            if self.certs
            else ["--insecure"]
        )
        config = [arg for k, v in self.nodes[i].items() for arg in (f"--{k}", str(v))]
        self._spawn(
            f"node-{i}",
            [
                sys.executable,
                "-m",
                "fedalora.launch.deploy",
                "supernode",
                "--superlink",
                self.address,
                *security,
                *config,
                "--port",
                str(self.node_ports[i]),
            ],
        )

    def stop_node(self, i: int) -> None:
        stop_process_tree(self.processes.pop(f"node-{i}"))

    def run(
        self,
        app: str | Path,
        run_name: str,
        output_dir: str | Path,
        run_config: str = "",
        timeout: float = 1800,
        progress: Callable[[str], None] | None = None,
    ) -> Path:
        """``flwr run`` the app on this federation; returns the completed run directory
        (``progress`` receives a line per finished round and each server warning)."""
        output_dir = Path(output_dir).resolve()
        check_run_config(app, run_config)
        command = [
            "run",
            str(Path(app).resolve()),
            CONNECTION,
            "--stream",
            "--run-config",
            f"run-name='{run_name}' output-dir='{output_dir}' {run_config}",
        ]
        log = self.root / f"{run_name}.log"
        run_dir = output_dir / run_name
        run_logged(
            [str(BIN / "flwr"), *command], Path(app), self.env, timeout, log, run_dir, progress
        )
        return completed_run(run_dir, log)

    def stop(self) -> None:
        """Stop every process this deployment started, by pid (nodes first)."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            stop_process_tree(self.processes.pop(name))

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _key(self, i: int) -> Path:
        return self.root / "keys" / f"node{i}"

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.root / f"{name}.log").open("a", encoding="utf-8")
        self.processes[name] = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def _flwr(self, args: list[str]) -> None:
        result = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {result.stdout}{result.stderr}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    certs = commands.add_parser("certs", help="make a CA and the SuperLink's certificate")
    certs.set_defaults(handler=_certs)
    certs.add_argument("--out", default="certs")
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or IP the SuperNodes reach the SuperLink by (repeat)",
    )
    key = commands.add_parser("node-key", help="make a SuperNode's key pair")
    key.set_defaults(handler=_node_key)
    key.add_argument("--out", required=True, help="private key path (public: <out>.pub)")
    link = commands.add_parser("superlink", help="start the SuperLink (foreground)")
    link.set_defaults(handler=_superlink)
    link.add_argument("--certs", help="the folder 'certs' wrote")
    link.add_argument("--host", default="0.0.0.0")  # noqa: S104 - remote SuperNodes connect
    link.add_argument("--port", type=int, default=8000)
    link.add_argument("--database", default="superlink.db")
    connection = commands.add_parser("connection", help="print the flwr CLI connection TOML")
    connection.set_defaults(handler=_connection)
    connection.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    connection.add_argument("--ca", help="the CA certificate (omit only with --insecure)")
    node = commands.add_parser("supernode", help="start a SuperNode (foreground)")
    node.set_defaults(handler=_supernode)
    node.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    node.add_argument("--ca", help="the CA certificate (ca.crt)")
    node.add_argument("--key", help="this node's private key from 'node-key'")
    hosted = node.add_mutually_exclusive_group(required=True)
    hosted.add_argument("--partition-id", type=int, help="the one client this node hosts")
    hosted.add_argument(
        "--partition-ids", help="the clients this node hosts as a cohort, e.g. '0,4,8'"
    )
    node.add_argument("--num-partitions", type=int, required=True)
    node.add_argument("--lora-rank", type=int)
    node.add_argument("--state-dir", help="where this node keeps its private factors")
    node.add_argument(
        "--dataset",
        help="this node's own data: a .json/.jsonl/.csv/.tsv/.parquet file or save_to_disk folder",
    )
    node.add_argument("--port", type=int, default=9094, help="the node's local runtime port")
    node.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="system",
        help="the node's memory allocator: jemalloc for a node hosting a cohort on CPU",
    )
    node.add_argument(
        "--rejoin-timeout",
        type=float,
        default=None,
        help="seconds to keep retrying while the SuperLink still holds this node "
        f"(default: its hold, 2 heartbeat intervals, plus {REJOIN_MARGIN:g})",
    )
    local = commands.add_parser("local", help="a SuperLink and SuperNodes on loopback, one run")
    local.set_defaults(handler=_local)
    local.add_argument("--ranks", default="8,4,2", help="one SuperNode per rank")
    local.add_argument("--root", default="deployment")
    local.add_argument("--run-config", default="num-server-rounds=2")
    for sub in (link, connection, node, local):
        sub.add_argument(
            "--insecure",
            action="store_true",
            help="no TLS, no node authentication (warns; never across machines)",
        )
    args = parser.parse_args(argv)
    if getattr(args, "insecure", False):
        print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr)

    args.handler(args)


def _certs(args: argparse.Namespace) -> None:
    """A CA and the SuperLink's certificate."""
    paths = make_certificates(args.out, args.host or ["localhost", "127.0.0.1"])
    print(f"CA {paths.ca}; SuperLink certificate {paths.certificate}, key {paths.key}")


def _node_key(args: argparse.Namespace) -> None:
    """A SuperNode's key pair."""
    private, public = make_node_key(args.out)
    print(f"private key {private} (keep on the node); public key {public} (register it)")


def _superlink(args: argparse.Namespace) -> None:
    """The SuperLink, in the foreground (this process becomes it)."""
    trust = (
        None
        if args.insecure
        else Certificates(
            *(Path(args.certs) / name for name in ("ca.crt", "server.pem", "server.key"))
        )
    )
    command = superlink_command(trust, args.host, args.port, Path(args.database))
    print(shlex.join(command), file=sys.stderr)
    os.execve(command[0], command, runtime_env())  # noqa: S606


def _connection(args: argparse.Namespace) -> None:
    """The flwr CLI connection TOML, on stdout."""
    print(connection_toml(CONNECTION, args.superlink, None if args.insecure else Path(args.ca)))


def _supernode(args: argparse.Namespace) -> None:
    """A SuperNode, in the foreground, restarted while the SuperLink still holds it."""
    config: dict[str, object] = {"num-partitions": args.num_partitions}
    for name in ("partition_id", "partition_ids", "lora_rank", "state_dir", "dataset"):
        if getattr(args, name) is not None:
            config[name.replace("_", "-")] = getattr(args, name)
    command = supernode_command(
        args.superlink,
        None if args.insecure else Path(args.ca),
        None if args.insecure else Path(args.key),
        config,
        args.port,
    )
    try:
        env = runtime_env(args.allocator)
    except ValueError as exc:
        raise SystemExit(f"--allocator: {exc}") from None
    print(shlex.join(command), file=sys.stderr, flush=True)
    raise SystemExit(supervise_supernode(command, env, args.rejoin_timeout))


def _local(args: argparse.Namespace) -> None:
    """A SuperLink and SuperNodes on loopback, and one run."""
    ranks = [int(r) for r in args.ranks.split(",")]
    nodes = [
        {"partition-id": i, "num-partitions": len(ranks), "lora-rank": r}
        for i, r in enumerate(ranks)
    ]
    root = Path(args.root)
    run_name = time.strftime("deploy-%Y%m%d-%H%M%S")
    run_config = f"min-nodes={len(ranks)} state-store='disk' {args.run_config}"
    try:
        check_run_config(Path.cwd(), run_config)
    except ConfigError as exc:
        raise refuse_run(root / "outputs" / run_name, exc) from None
    with LocalDeployment(root, nodes, secure=not args.insecure) as deployment:
        try:
            run_dir = deployment.run(
                Path.cwd(), run_name, root / "outputs", run_config, progress=print
            )
        except SimulationFailed as exc:
            raise SystemExit(str(exc)) from None
    print(f"completed: {run_dir}")


if __name__ == "__main__":
    main()
