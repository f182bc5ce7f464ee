"""The Flower ServerApp: validate the configuration, discover the nodes' ranks, run the
strategy (checkpointing every round, or resuming from the last checkpoint), and write
the run directory (config, metrics, rounds, checkpoint, shared state, summary)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedalora.adapters.adapter import label_map
from fedalora.checkpoint import (
    RESUMABLE_CHANGES,
    Checkpoint,
    config_changes,
    load_checkpoint,
    save_checkpoint,
)
from fedalora.config import FedConfig, OutputSettings, validate_rank
from fedalora.errors import ConfigError, RunFailed
from fedalora.models import adapted_layer_shapes
from fedalora.outputs import INTERRUPTED, RunRecorder, final_figures
from fedalora.tracking import open_tracker
from strategies import Node, discover_nodes, make_strategy, run_rounds
from strategies.protocol import RUN_NAME

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    raw = context.run_config  # read before validation so that a bad config is recorded too
    run_name = str(
        raw.get("run-name") or f"{raw.get('strategy', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    output_dir = Path(str(raw.get("output-dir", OutputSettings.output_dir))).expanduser().resolve()
    recorder = RunRecorder(output_dir / run_name)
    started = time.perf_counter()
    try:
        config = FedConfig.from_run_config(raw)
        recorder.begin(resume=config.faults.resume)
        with recorder.warnings_to_file(FLOWER_LOGGER):
            recorder.attach(open_tracker(config.outputs.tracker, recorder.run_dir, run_name))
            summary = run_federation(grid, config, run_name, recorder)
    except ConfigError as exc:  # the user's to fix: the headline, once
        log(ERROR, "%s", exc)
        recorder.finish(
            "failed", error=str(exc), error_key=exc.key, wall_seconds=time.perf_counter() - started
        )
        raise
    except RunFailed as exc:  # the clients' own errors: the headline, once
        log(ERROR, "%s", exc)
        recorder.finish("failed", error=str(exc), wall_seconds=time.perf_counter() - started)
        raise
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C; SIGTERM (Flower's handler exits)
        recorder.finish(
            INTERRUPTED,
            error=f"{type(exc).__name__}: {exc}",
            wall_seconds=time.perf_counter() - started,
        )
        raise
    except BaseException as exc:
        recorder.finish(
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            wall_seconds=time.perf_counter() - started,
        )
        raise
    recorder.finish("completed", wall_seconds=time.perf_counter() - started, **summary)


def run_federation(grid: Grid, config: FedConfig, run_name: str, recorder: RunRecorder) -> dict:
    """Everything before training is validated; returns the final figures. RunFailed
    when no round trained (every client failed, or every update was left out).

    With ``checkpoint=true`` the shared and strategy state is checkpointed after every
    round; ``resume=true`` continues from the last checkpoint of ``run-name``.
    """
    layer_shapes = adapted_layer_shapes(
        config.model.name, config.lora.target_modules, config.model.num_hidden_layers
    )
    for rank in config.run.rank_list:
        validate_rank("ranks", rank, layer_shapes)
    saved = _checkpoint_to_resume(config, recorder.run_dir) if config.faults.resume else None
    resume_after = saved.server_round if saved else 0
    strategy = make_strategy(config, layer_shapes, recorder)
    strategy.connect(discover_nodes(grid, config.run.min_nodes, config.faults.round_timeout))
    if saved:
        strategy.restore(saved)
        log(
            INFO,
            "resuming '%s' after round %d of %d",
            run_name,
            resume_after,
            config.run.num_server_rounds,
        )
    recorder.start(resume_after=resume_after)
    recorder.write_config(
        {
            **config.to_run_config(),
            "run-name": run_name,
            "clients": [
                {
                    "client": n.partition_id,
                    "rank": n.rank,
                    "num_examples": n.num_examples,
                    "num_test_examples": n.num_test_examples,
                }
                for n in strategy.clients.values()
            ],
            "adapted_layers": {k: list(v) for k, v in layer_shapes.items()},
            "metric": strategy.metric,
            **_heads_and_labels(strategy.clients.values()),
        }
    )

    def checkpoint(server_round: int) -> None:
        if config.faults.checkpoint:
            save_checkpoint(recorder.run_dir, strategy.checkpoint(server_round))

    run_rounds(
        strategy,
        grid,
        first_round=resume_after + 1,
        retries=config.faults.round_retries,
        timeout=config.faults.round_timeout,
        train_config=ConfigRecord({RUN_NAME: run_name}),
        evaluate_config=ConfigRecord({RUN_NAME: run_name}),
        on_round_end=checkpoint,
    )
    strategy.require_training()
    recorder.save_shared(strategy.shared)
    return {
        "rounds": strategy.last_round.get("round", resume_after),
        "num_clients": len(strategy.clients),
        "resumed_after_round": resume_after or None,
        "trained_rounds": strategy.trained_rounds,
        "stopped_early": strategy.stopped,
        **final_figures(strategy.last_round, strategy.metric),
        **strategy.summary_fields(),
    }


def _heads_and_labels(nodes: Iterable[Node]) -> dict[str, Any]:
    """config.json's record of the clients' local head (``trained_head``: its modules,
    trained and kept on each client; every node loads the same model) and label map
    (``id2label``, ``label2id``)."""
    nodes = list(nodes)
    if not nodes:
        return {"trained_head": []}
    labels = sorted({n.labels for n in nodes})
    if len(labels) > 1:
        log(
            WARNING,
            "the nodes' data sets have different labels (%s); each client's head is its "
            "own, config.json records the first node's label map",
            "; ".join(",".join(group) for group in labels),
        )
    first = nodes[0]
    return {"trained_head": list(first.head), **(label_map(first.labels) if first.labels else {})}


def _checkpoint_to_resume(config: FedConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint ``resume=true`` continues from; ConfigError if it cannot."""
    saved = load_checkpoint(run_dir)
    if saved is None:
        raise ConfigError(
            "resume",
            f"no checkpoint in '{run_dir}'; give the run-name of a "
            "run started with checkpoint=true, or set resume=false",
        )
    changed = config_changes(saved.config, config.to_run_config())
    if changed:
        raise ConfigError(
            "resume",
            f"run-config {changed} differ from the checkpoint's; "
            "resume with the interrupted run's values (only "
            f"{sorted(RESUMABLE_CHANGES)} may change)",
        )
    if saved.server_round >= config.run.num_server_rounds:
        raise ConfigError(
            "num-server-rounds",
            f"the checkpoint already has round "
            f"{saved.server_round} of {config.run.num_server_rounds}; raise "
            "num-server-rounds to train further",
        )
    return saved
