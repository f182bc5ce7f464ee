"""The data section of the run configuration (``fedalora.config.FedConfig.data``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import require
from ..settings import Section, section, setting
from .columns import ColumnNames
from .sources import LOCAL_FORMS

_PARTITIONING = re.compile(r"^(iid|task|dirichlet:(?P<alpha>[0-9.eE+-]+))$")


@dataclass(frozen=True)
class DataSettings(Section):
    """Which data, how it is split into clients and held out, and how long an example is."""

    title = "Data"

    dataset: str = setting(
        "dataset",
        "bbc-news",
        "classification: `bbc-news`, `20newsgroups`, `reuters-r8` (packaged); instruction "
        "tuning: `instructions` (packaged, 8 tasks); or a local `.json`/`.jsonl`/`.csv`/"
        "`.tsv`/`.parquet` file, a folder written by `datasets`' `save_to_disk` (its `train` "
        "split) or a Hugging Face id with `text` and `label` columns (classification) or "
        "`instruction` and `response` columns (instruction tuning, plus `task` for one task "
        "per client); other column names through the `*-column` keys",
    )
    columns: ColumnNames = section(ColumnNames)
    drop_incomplete_rows: bool = setting(
        "drop-incomplete-rows",
        False,
        "rows of a local or Hugging Face data set with an empty or missing text, label, "
        "instruction or response: `false` stops before training and names the rows; `true` "
        "drops them (and logs how many)",
    )
    partitioning: str = setting(
        "partitioning",
        "dirichlet:0.5",
        "`iid`, `dirichlet:<alpha>` over labels, or `task` (one group per value of a `task` "
        "column); flwr-datasets partitioners. Instruction data have no labels: use `iid` or "
        "`task`",
    )
    clients_per_group: int = setting(
        "clients-per-group",
        1,
        "clients that share one data group: the data are split into clients / "
        "clients-per-group groups by `partitioning`, and each group's examples into equal "
        "random shares for its clients; with `ranks` of c values (or a divisor of c), every "
        "group has clients of every rank",
    )
    test_fraction: float = setting(
        "test-fraction", 0.2, "share of each client's partition held out for its evaluation"
    )
    max_length: int = setting(
        "max-length", 64, "tokens per example (instruction data: prompt + response)"
    )
    global_test_examples: int = setting(
        "global-test-examples",
        0,
        "in the last round also score every client on this many examples (seeded sample) of "
        "the data set's official test split (`20newsgroups`, `reuters-r8`), as "
        "`global_accuracy`; 0 = off",
    )
    max_new_tokens: int = setting(
        "max-new-tokens", 16, "instruction data: tokens generated per answer when scoring"
    )

    def validate(self) -> None:
        require(
            bool(self.dataset.strip()),
            "dataset",
            f"give a packaged data set, a local {LOCAL_FORMS} or a Hugging Face id",
        )
        self.columns.validate()
        require(
            _PARTITIONING.match(self.partitioning) is not None,
            "partitioning",
            f"got '{self.partitioning}'; allowed: 'iid', 'task', 'dirichlet:<alpha>'",
        )
        if self.partitioning.startswith("dirichlet:"):
            require(self.dirichlet_alpha > 0, "partitioning", "dirichlet alpha must be > 0")
        require(
            self.clients_per_group >= 1,
            "clients-per-group",
            "must be >= 1 (clients that share one data group: a task, or one IID or "
            "Dirichlet part)",
        )
        require(0.0 < self.test_fraction < 1.0, "test-fraction", "must be in (0, 1)")
        require(self.max_length >= 8, "max-length", "must be >= 8 tokens")
        require(
            self.max_new_tokens >= 1,
            "max-new-tokens",
            "must be >= 1 (tokens generated per answer on instruction data)",
        )
        require(
            self.global_test_examples >= 0,
            "global-test-examples",
            "must be >= 0 (0: no scoring on the data set's official test split)",
        )

    @property
    def dirichlet_alpha(self) -> float:
        return float(self.partitioning.split(":", 1)[1])
