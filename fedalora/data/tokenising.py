"""One client's data: its partition split into train and held-out test and tokenised
once per worker (classification: text; instruction: prompt and response, the prompt
masked out of the loss); and the official test split of a packaged data set."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from ..errors import ConfigError
from .collating import IGNORE
from .columns import DEFAULT_COLUMNS, ColumnNames, is_instruction_data
from .partitioning import _cached_partitioner
from .sources import ORANGE_STEMS, _orange_dataset, load_labelled_dataset

ANSWER = "\nAnswer:"


@dataclass(frozen=True)
class ClientData:
    """One client's tokenised local train and held-out test examples."""

    train: dict[str, list]
    test: dict[str, list]
    num_labels: int  # 0 for instruction data

    @property
    def is_instruction(self) -> bool:
        return self.num_labels == 0

    @property
    def num_train(self) -> int:
        return len(self.train["labels"])

    @property
    def num_test(self) -> int:
        return len(self.test["labels"])


@functools.lru_cache(maxsize=64)
def load_client_data(
    dataset_name: str,
    partitioning: str,
    partition_id: int,
    num_partitions: int,
    test_fraction: float,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    clients_per_group: int = 1,
    columns: ColumnNames = DEFAULT_COLUMNS,
    drop_incomplete: bool = False,
) -> ClientData:
    """Partition ``partition_id``'s tokenised split (cached per worker process); ``columns``
    names a user data set's columns, ``drop_incomplete`` leaves out its incomplete rows.

    The data set is first split into ``num_partitions / clients_per_group`` groups by
    ``partitioning`` (one per task, or IID, or Dirichlet over labels); client p takes an
    equal, seeded random share of group p // clients_per_group, so the clients of a
    group share one data distribution.
    """
    if num_partitions % clients_per_group:
        raise ConfigError(
            "clients-per-group",
            f"{num_partitions} clients do not split into groups of {clients_per_group}; "
            "use a number of clients that it divides",
        )
    dataset = load_labelled_dataset(dataset_name, columns, drop_incomplete)
    group, member = divmod(partition_id, clients_per_group)
    num_groups = num_partitions // clients_per_group
    partitioner = _cached_partitioner(
        dataset_name, columns, drop_incomplete, partitioning, num_groups, seed
    )
    try:
        partition = partitioner.load_partition(group)
    except ValueError as exc:  # flwr-datasets: "The max number of attempts ... was reached"
        if "attempts" not in str(exc):
            raise
        raise ConfigError(
            "partitioning",
            f"'{partitioning}' could not split the {len(dataset)} examples "
            f"({len(set(dataset['label']))} classes) into {num_groups} parts of a useful size "
            "(flwr-datasets gave up drawing); use a larger alpha (e.g. 'dirichlet:1.0'), "
            "fewer clients, or 'iid'",
        ) from exc
    if clients_per_group > 1:
        partition = partition.shuffle(seed=seed).shard(clients_per_group, member, contiguous=True)
    if len(partition) < 2:
        raise ConfigError(
            "partitioning",
            f"client {partition_id} got {len(partition)} examples; "
            "use fewer clients, more data or a larger dirichlet alpha",
        )
    split = partition.train_test_split(test_size=test_fraction, seed=seed)
    if is_instruction_data(dataset):
        return ClientData(
            _tokenise_instructions(split["train"], tokenizer, max_length),
            _tokenise_instructions(split["test"], tokenizer, max_length),
            0,
        )
    num_labels = dataset.features["label"].num_classes
    return ClientData(
        _tokenise(split["train"], tokenizer, max_length),
        _tokenise(split["test"], tokenizer, max_length),
        num_labels,
    )


@functools.lru_cache(maxsize=4)
def load_official_test(
    dataset_name: str,
    num_examples: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> dict[str, list]:
    """A seeded sample of ``num_examples`` from the data set's official test split,
    tokenised, with labels in the training split's label order (cached per worker)."""
    if dataset_name not in ORANGE_STEMS:
        raise ConfigError(
            "global-test-examples",
            f"data set '{dataset_name}' has no official "
            f"test split (those that do: {', '.join(ORANGE_STEMS)}); set it to 0",
        )
    names = load_labelled_dataset(dataset_name).features["label"].names
    test = _orange_dataset(dataset_name, "test").filter(lambda row: row["label"] in names)
    test = test.cast_column("label", datasets.ClassLabel(names=names))
    test = test.shuffle(seed=seed).select(range(min(num_examples, len(test))))
    return _tokenise(test, tokenizer, max_length)


def _tokenise(
    split: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list]:
    encoded = tokenizer(list(split["text"]), truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "labels": list(split["label"])}


def _tokenise_instructions(
    split: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list]:
    """``instruction + ANSWER`` as the prompt (cut to fit), `` response<eos>`` as the target;
    labels are ``IGNORE`` over the prompt. Keeps ``prompt_ids`` and ``references`` for
    scoring generated responses."""
    suffix = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    input_ids, labels, prompts = [], [], []
    for instruction, response in zip(split["instruction"], split["response"], strict=True):
        target = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
        target = [*target[: max_length // 2], tokenizer.eos_token_id]
        room = max(1, max_length - len(target) - len(suffix))
        prompt = tokenizer(instruction, add_special_tokens=False)["input_ids"][:room] + suffix
        input_ids.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
        prompts.append(prompt)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_ids": prompts,
        "references": list(split["response"]),
    }
