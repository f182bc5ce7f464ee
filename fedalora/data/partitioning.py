"""Partitioning a data set into clients with flwr-datasets' partitioners (IID,
Dirichlet over labels, one group per task), groups shared by several clients."""

from __future__ import annotations

import functools

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from ..errors import ConfigError
from .columns import ColumnNames
from .sources import load_labelled_dataset


def make_partitioner(
    dataset: datasets.Dataset, partitioning: str, num_partitions: int, seed: int
) -> Partitioner:
    """flwr-datasets partitioner of ``num_partitions`` parts for 'iid',
    'dirichlet:<alpha>' (over labels) or 'task' (one part per value of a 'task' column)."""
    if num_partitions > len(dataset):
        raise ConfigError(
            "partitioning",
            f"{num_partitions} clients but only {len(dataset)} "
            "examples; use fewer clients or more data",
        )
    if partitioning == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning == "task":
        if "task" not in dataset.column_names:
            raise ConfigError(
                "partitioning",
                "'task' needs a task column in the data set (name a file's with task-column=); "
                "use 'iid' or 'dirichlet:<alpha>'",
            )
        num_tasks = len(set(dataset["task"]))
        if num_tasks != num_partitions:
            raise ConfigError(
                "partitioning",
                f"'task' gives one group of clients per task: the data has {num_tasks} "
                f"tasks but the federation has {num_partitions} groups (clients / "
                "clients-per-group)",
            )
        partitioner = NaturalIdPartitioner(partition_by="task")
    else:
        if "label" not in dataset.column_names:
            raise ConfigError(
                "partitioning",
                "'dirichlet:<alpha>' splits over labels and "
                "this data set has none; use 'iid' or 'task'",
            )
        alpha = float(partitioning.split(":", 1)[1])
        min_size = max(1, min(10, len(dataset) // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
    partitioner.dataset = dataset
    return partitioner


@functools.lru_cache(maxsize=4)
def _cached_partitioner(
    name: str,
    columns: ColumnNames,
    drop_incomplete: bool,
    partitioning: str,
    num_partitions: int,
    seed: int,
) -> Partitioner:
    return make_partitioner(
        load_labelled_dataset(name, columns, drop_incomplete), partitioning, num_partitions, seed
    )
