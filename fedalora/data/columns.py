"""Column naming and labels: the columns that make a data set classification or
instruction data, the user's column names, complete rows, and labels as class ids."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import datasets
import pyarrow

from ..errors import ConfigError, require
from ..settings import Section, setting

_LOG = logging.getLogger(__name__)


#: Column pairs that make a data set classification or instruction data.
DATA_KINDS = (("text", "label"), ("instruction", "response"))


#: Columns that must hold text.
TEXT_COLUMNS = ("text", "instruction", "response")


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


def is_instruction_data(dataset: datasets.Dataset) -> bool:
    return {"instruction", "response"} <= set(dataset.column_names)


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
