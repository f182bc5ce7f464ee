"""Experiment trackers (run-config ``tracker``): the server's records of a run also in
TensorBoard, MLflow or Weights & Biases, each written offline into the run directory.

Only the server writes them, from what it records anyway (config.json, rounds.jsonl,
metrics.jsonl, summary.json), so nothing private reaches a tracker. Each library is
imported when its tracker is opened; clients need none of them. No Flower import.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError, require

NONE, TENSORBOARD, MLFLOW, WANDB = "none", "tensorboard", "mlflow", "wandb"
#: run-config ``tracker``.
TRACKERS = (NONE, TENSORBOARD, MLFLOW, WANDB)
#: The project a tracker files runs under (MLflow's experiment, W&B's project).
PROJECT = __package__ or "fedalora-runs"
#: Fields of a metrics.jsonl row that say whose figures it holds, not figures.
_ROW_IDENTITY = frozenset({"round", "client", "rank", "phase"})

Scalar = str | int | float | bool


class Tracker(abc.ABC):
    """A run in one tracking library: the configuration as parameters, every round's
    figures at step = round, and the final summary. Subclasses write them."""

    #: The module that must import, and the pip package that provides it.
    module: ClassVar[str]
    package: ClassVar[str]
    #: Environment defaults that keep the library offline and quiet (set unless set).
    offline_env: ClassVar[Mapping[str, str]] = {}

    def __init__(self, run_dir: Path, run_name: str) -> None:
        """Open the run ``run_name``, its files under ``run_dir``."""
        self.run_name = run_name
        self.step = 0  # the last round logged

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved configuration, nested values flattened to ``key/sub`` names."""
        self.write_params(flat_params(config))

    def log_round(
        self, round_row: Mapping[str, Any], client_rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """A rounds.jsonl row and that round's metrics.jsonl rows, at step = round."""
        self.step = int(round_row["round"])
        self.write_metrics(round_figures(round_row, client_rows), self.step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """summary.json's status and figures (at the last round's step); then close."""
        self.write_summary(
            str(summary["status"]), {k: v for k, v in summary.items() if k != "status"}
        )

    @abc.abstractmethod
    def write_params(self, params: Mapping[str, Scalar]) -> None:
        """Record the parameters."""

    @abc.abstractmethod
    def write_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record figures at ``step``."""

    @abc.abstractmethod
    def write_summary(self, status: str, figures: Mapping[str, Any]) -> None:
        """Record the final status and figures, then flush and close the tracker."""


class TensorBoardTracker(Tracker):
    """Event files in ``<run_dir>/tensorboard/`` (torch's SummaryWriter): the
    configuration and the summary as text, the figures as scalars."""

    module, package = "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, run_name: str) -> None:
        super().__init__(run_dir, run_name)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write_params(self, params: Mapping[str, Scalar]) -> None:
        self.writer.add_text("config", _markdown_table({"run": self.run_name, **params}), 0)

    def write_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def write_summary(self, status: str, figures: Mapping[str, Any]) -> None:
        try:
            self.writer.add_text(
                "summary", _markdown_table({"status": status, **figures}), self.step
            )
            for key, value in numeric_figures(figures).items():
                self.writer.add_scalar(f"summary/{key}", value, self.step)
        finally:
            self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``fedalora``: in a local file store at
    ``<run_dir>/mlruns`` unless MLFLOW_TRACKING_URI names a tracking server or store."""

    module, package = "mlflow", "mlflow-skinny"
    # MLflow 3 sends usage telemetry unless told not to, and refuses a file store
    # (in maintenance mode, still supported) unless allowed.
    offline_env: ClassVar[Mapping[str, str]] = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    #: MLflow's log_batch limits on one request.
    _MAX_PARAMS, _MAX_METRICS = 100, 1000

    def __init__(self, run_dir: Path, run_name: str) -> None:
        super().__init__(run_dir, run_name)
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def write_params(self, params: Mapping[str, Scalar]) -> None:
        from mlflow.entities import Param

        entities = [Param(key, str(value)) for key, value in params.items()]
        for chunk in _chunks(entities, self._MAX_PARAMS):
            self.client.log_batch(self.run_id, params=chunk)

    def write_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        entities = [Metric(key, value, stamp, step) for key, value in metrics.items()]
        for chunk in _chunks(entities, self._MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk)

    def write_summary(self, status: str, figures: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        try:
            texts = {"status": status, **{k: v for k, v in figures.items() if isinstance(v, str)}}
            self.client.log_batch(
                self.run_id, tags=[RunTag(f"summary/{k}", v) for k, v in texts.items()]
            )
            numbers = numeric_figures(figures)
            self.write_metrics({f"summary/{k}": v for k, v in numbers.items()}, self.step)
        finally:
            self.client.set_terminated(
                self.run_id, "FINISHED" if status == "completed" else "FAILED"
            )


class WandbTracker(Tracker):
    """A W&B run, offline unless WANDB_MODE says otherwise: its files in
    ``<run_dir>/wandb/offline-run-*/`` (``wandb sync`` uploads them later)."""

    module, package = "wandb", "wandb"
    offline_env: ClassVar[Mapping[str, str]] = {
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
    }

    def __init__(self, run_dir: Path, run_name: str) -> None:
        super().__init__(run_dir, run_name)
        import wandb

        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            dir=str(run_dir),
            project=PROJECT,
            name=run_name,
            # no capture of the server's console, no system-metrics sampling process
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def write_params(self, params: Mapping[str, Scalar]) -> None:
        self.run.config.update(dict(params))

    def write_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def write_summary(self, status: str, figures: Mapping[str, Any]) -> None:
        try:
            texts = {k: v for k, v in figures.items() if isinstance(v, str)}
            self.run.summary.update({"status": status, **texts, **numeric_figures(figures)})
        finally:
            self.run.finish(exit_code=0 if status == "completed" else 1)


_TRACKER_CLASSES: dict[str, type[Tracker]] = {
    TENSORBOARD: TensorBoardTracker,
    MLFLOW: MLflowTracker,
    WANDB: WandbTracker,
}


def open_tracker(name: str, run_dir: str | Path, run_name: str) -> Tracker | None:
    """The tracker run-config ``tracker`` names (None for ``none``); ConfigError with
    the pip command when its library is not installed."""
    require(name in TRACKERS, "tracker", f"choose one of: {', '.join(TRACKERS)}")
    if name == NONE:
        return None
    tracker_class = _TRACKER_CLASSES[name]
    for key, value in tracker_class.offline_env.items():
        os.environ.setdefault(key, value)
    try:
        importlib.import_module(tracker_class.module)
    except ImportError as exc:
        raise ConfigError(
            "tracker",
            f"tracker='{name}' needs the {tracker_class.package} package, which is not "
            f"installed; install it with: pip install 'fedalora[{name}]' "
            f"(or pip install {tracker_class.package}), or set tracker='none'",
        ) from exc
    return tracker_class(Path(run_dir), run_name)


# ----------------------------------------------------------------- figures
def flat_params(config: Mapping[str, Any]) -> dict[str, Scalar]:
    """Scalars as they are; mappings and lists of them flattened to ``key/sub`` (list
    items by index); a list of scalars (a layer's shape) as its JSON text."""

    def flatten(prefix: str, value: Any) -> Iterator[tuple[str, Scalar]]:
        if isinstance(value, Mapping):
            for key, item in value.items():
                yield from flatten(f"{prefix}/{key}", item)
        elif isinstance(value, list | tuple) and any(
            isinstance(item, Mapping | list | tuple) for item in value
        ):
            for index, item in enumerate(value):
                yield from flatten(f"{prefix}/{index}", item)
        elif isinstance(value, list | tuple):
            yield prefix, json.dumps(list(value))
        else:
            yield prefix, value

    return dict(item for key, value in config.items() for item in flatten(str(key), value))


def numeric_figures(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record (booleans as 0/1), without its None and text values."""
    return {key: float(value) for key, value in row.items() if isinstance(value, int | float)}


def round_figures(
    round_row: Mapping[str, Any], client_rows: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """A round's figures: ``round/<key>`` for the rounds.jsonl row's numbers,
    ``clients/<id>/<phase>/<metric>`` for each client's metrics.jsonl rows (the last
    row of a client and phase), and ``rank-<r>/<phase>/<metric>``, their mean over the
    clients of rank r."""
    figures = {
        f"round/{key}": value for key, value in numeric_figures(round_row).items() if key != "round"
    }
    latest = {(row["client"], row["phase"]): row for row in client_rows}
    tiers: defaultdict[str, list[float]] = defaultdict(list)
    for (client, phase), row in latest.items():
        for metric, value in numeric_figures(row).items():
            if metric not in _ROW_IDENTITY:
                figures[f"clients/{client}/{phase}/{metric}"] = value
                tiers[f"rank-{row['rank']}/{phase}/{metric}"].append(value)
    return figures | {tag: sum(values) / len(values) for tag, values in tiers.items()}


def _markdown_table(values: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in values.items())
    return f"| key | value |\n|---|---|\n{rows}"


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
