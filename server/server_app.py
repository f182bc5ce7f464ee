"""The Flower ServerApp: validate the configuration, discover the nodes' ranks, run the
strategy, and write the run directory (config, metrics, rounds, shared state, summary)."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedalora.config import FedConfig, validate_rank
from fedalora.models import adapted_layer_shapes
from fedalora.outputs import RunRecorder
from strategies import STRATEGIES
from strategies.common import to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    raw = context.run_config  # read before validation so that a bad config is recorded too
    run_name = str(raw.get("run-name") or
                   f"{raw.get('strategy', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir = Path(str(raw.get("output-dir", FedConfig.output_dir))).expanduser().resolve()
    recorder = RunRecorder(output_dir / run_name)
    started = time.perf_counter()
    try:
        config = FedConfig.from_run_config(raw)
        summary = run_federation(grid, config, run_name, recorder)
    except BaseException as exc:
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}",
                        wall_seconds=time.perf_counter() - started)
        raise
    recorder.finish("completed", wall_seconds=time.perf_counter() - started, **summary)


def run_federation(grid: Grid, config: FedConfig, run_name: str,
                   recorder: RunRecorder) -> dict:
    """Everything before training is validated; returns the final figures."""
    layer_shapes = adapted_layer_shapes(config.model, config.target_modules,
                                        config.num_hidden_layers)
    for rank in config.rank_list:
        validate_rank("ranks", rank, layer_shapes)
    strategy = STRATEGIES[config.strategy](config, layer_shapes, recorder)
    nodes = strategy.discover(grid, config.round_timeout)
    recorder.write_config({**config.to_run_config(), "run-name": run_name,
                           "clients": [{"client": n.partition_id, "rank": n.rank,
                                        "num_examples": n.num_examples}
                                       for n in nodes.values()],
                           "adapted_layers": {k: list(v) for k, v in layer_shapes.items()}})
    result = strategy.start(grid, to_record(strategy.shared), num_rounds=config.num_server_rounds,
                            timeout=config.round_timeout,
                            train_config=ConfigRecord({"run-name": run_name}),
                            evaluate_config=ConfigRecord({"run-name": run_name}))
    recorder.save_shared(strategy.shared)
    final = result.evaluate_metrics_clientapp.get(config.num_server_rounds)
    return {"rounds": config.num_server_rounds, "num_clients": len(nodes),
            "final_mean_accuracy": None if final is None else final["mean-accuracy"],
            "final_worst_accuracy": None if final is None else final["worst-accuracy"]}
