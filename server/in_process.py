"""The app in one process: the same ServerApp, strategy and ClientApp as a Flower
simulation, with each message handed to its node's ClientApp in this process, one after
another (no SuperLink, no Ray). For machines without Ray (the GPU machine), for quick
experiments and for a debugger; for the same seed it gives the Ray simulation's results.

    python -m server.in_process --num-supernodes 8 --run-name quick --run-config "..."
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from fedalora.errors import ConfigError
from fedalora.run_config import parse_run_config, resolve_run_config
from server.server_app import app as server_app

RUN_ID = 1
#: What a node runs: a ClientApp, or anything that answers a message the same way.
NodeApp = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    """Nodes whose ClientApp runs in this process: node ``100 + i`` is partition ``i`` of
    ``num_nodes``, with its own Context (its state persists across the run)."""

    def __init__(self, app: NodeApp, run_config: Mapping[str, Any], num_nodes: int) -> None:
        self.app = app
        self._run = Run.create_empty(RUN_ID)
        self.contexts = {
            100 + i: Context(
                run_id=RUN_ID,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; a raising ClientApp
        answers with an error reply, as in a simulation."""
        ids = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - any ClientApp failure is a reply
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                    reply_to=message,
                )
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    app_dir: str | Path,
    run_name: str,
    *,
    num_supernodes: int = 8,
    run_config: str = "",
    output_dir: str | Path | None = None,
    node_app: NodeApp | None = None,
    log_path: str | Path | None = None,
) -> Path:
    """Run the app with ``num_supernodes`` in-process nodes; returns the run directory
    (its summary.json says whether the run completed). ``node_app`` replaces the
    ClientApp every node runs (tests and benchmarks wrap it, e.g. with a hostile one);
    with ``log_path`` Flower's log of the run goes to that file instead of the console."""
    app_dir = Path(app_dir).resolve()
    output_dir = Path(output_dir or app_dir / "outputs").resolve()
    config = resolve_run_config(
        app_dir,
        {**parse_run_config(run_config), "run-name": run_name, "output-dir": str(output_dir)},
    )
    grid = InProcessGrid(node_app or client_app, config, num_supernodes)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    context = Context(
        run_id=RUN_ID,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=config,
    )
    with flower_log_in(log_path):
        server_app(grid, context)
    return output_dir / run_name


@contextlib.contextmanager
def flower_log_in(path: str | Path | None) -> Iterator[None]:
    """Flower's log (the server's rounds and warnings) written to ``path`` alone while
    inside; nothing changes when ``path`` is None."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s: %(message)s"))
    replaced = list(FLOWER_LOGGER.handlers)
    for old in replaced:
        FLOWER_LOGGER.removeHandler(old)
    FLOWER_LOGGER.addHandler(handler)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()
        for old in replaced:
            FLOWER_LOGGER.addHandler(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=".", help="the Flower app directory")
    parser.add_argument("--run-name", default=time.strftime("run-%Y%m%d-%H%M%S"))
    parser.add_argument("--num-supernodes", type=int, default=8)
    parser.add_argument("--run-config", default="", help="e.g. \"strategy='fedalora' ranks='8'\"")
    parser.add_argument("--output-dir", default=None, help="default: <app>/outputs")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        run_dir = run_in_process(
            args.app,
            args.run_name,
            num_supernodes=args.num_supernodes,
            run_config=args.run_config,
            output_dir=args.output_dir,
        )
    except ConfigError as exc:  # a key or value refused before the run started
        raise SystemExit(str(exc)) from None
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"{summary['status']} in {time.perf_counter() - started:.0f} s: {run_dir}")
    print(json.dumps(summary, indent=2))
    if summary["status"] != "completed":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
