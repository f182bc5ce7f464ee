"""Local data in every accepted form, the user's column names, and the errors that
tell a user what is wrong with a data file before any training."""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import pytest

from fedalora.config import FedConfig
from fedalora.data import (
    DEFAULT_COLUMNS,
    ColumnNames,
    load_client_data,
    load_labelled_dataset,
    num_labels_of,
)
from fedalora.errors import ConfigError
from fedalora.models import load_base_model

CLASSIFICATION = {
    "text": [f"story {i}, about {'goals' if i % 2 else 'chips'}" for i in range(12)],
    "label": ["sport" if i % 2 else "tech" for i in range(12)],
}
INSTRUCTION = {
    "instruction": [f"Name the colour of thing {i}, please." for i in range(12)],
    "response": ["white" if i % 3 else "black" for i in range(12)],
    "task": ["colours" if i % 2 else "shades" for i in range(12)],
}
FORMS = [".tsv", ".parquet", ".json", ".jsonl", "save_to_disk"]


def write(directory: Path, form: str, columns: dict[str, list[str]]) -> Path:
    """``columns`` as a file of ``form`` (a suffix, or a save_to_disk folder)."""
    dataset = datasets.Dataset.from_dict(columns)
    path = directory / ("saved" if form == "save_to_disk" else f"data{form}")
    if form in (".csv", ".tsv"):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="," if form == ".csv" else "\t")
            writer.writerow(columns)
            writer.writerows(zip(*columns.values(), strict=True))
    elif form == ".parquet":
        dataset.to_parquet(path)
    elif form == ".json":
        dataset.to_json(path, lines=False)
    elif form == ".jsonl":
        dataset.to_json(path)
    else:
        dataset.save_to_disk(path)
    return path


def rows(name: str | Path, columns: ColumnNames = DEFAULT_COLUMNS) -> list[dict]:
    return load_labelled_dataset(str(name), columns).to_list()


def load_error(name: str | Path, columns: ColumnNames = DEFAULT_COLUMNS) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_labelled_dataset(str(name), columns)
    return info.value


@pytest.fixture(scope="module")
def tokenizer():
    return load_base_model("minilm", 2, num_hidden_layers=1).tokenizer


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("columns", [CLASSIFICATION, INSTRUCTION], ids=["labels", "instructions"])
def test_every_form_loads_the_rows_of_the_csv(tmp_path, form, columns):
    (tmp_path / "csv").mkdir()
    expected = rows(write(tmp_path / "csv", ".csv", columns))
    assert len(expected) == 12 and set(expected[0]) == set(columns)
    assert rows(write(tmp_path, form, columns)) == expected


def test_a_save_to_disk_dataset_dict_gives_its_train_split(tmp_path):
    train = datasets.Dataset.from_dict(CLASSIFICATION)
    held_out = train.select(range(2))
    datasets.DatasetDict({"train": train, "test": held_out}).save_to_disk(tmp_path / "saved")
    assert rows(tmp_path / "saved") == rows(write(tmp_path, ".csv", CLASSIFICATION))


def test_the_column_keys_rename_the_users_columns(tmp_path):
    keys = {"text-column": "body", "label-column": "topic"}
    columns = FedConfig.from_run_config(keys).data.columns
    body = {"body": CLASSIFICATION["text"], "topic": CLASSIFICATION["label"], "text": ["x"] * 12}
    (tmp_path / "labels").mkdir()
    renamed = write(tmp_path / "labels", ".parquet", body)
    assert rows(renamed, columns) == rows(write(tmp_path, ".csv", CLASSIFICATION))
    assert num_labels_of(str(renamed), columns) == 2

    keys = {"instruction-column": "prompt", "response-column": "answer", "task-column": "skill"}
    columns = FedConfig.from_run_config(keys).data.columns
    prompts = dict(zip(("prompt", "answer", "skill"), INSTRUCTION.values(), strict=True))
    (tmp_path / "instructions").mkdir()
    renamed = write(tmp_path / "instructions", ".tsv", prompts)
    assert rows(renamed, columns) == rows(write(tmp_path, ".jsonl", INSTRUCTION))
    assert num_labels_of(str(renamed), columns) == 0


def test_a_column_key_naming_a_missing_column_names_the_key(tmp_path):
    path = write(tmp_path, ".csv", CLASSIFICATION)
    error = load_error(path, ColumnNames(label="topic"))
    assert error.key == "label-column"
    assert "has no column 'topic'; its columns are ['text', 'label']" in str(error)


@pytest.mark.parametrize(
    "value, problem",
    [("", "give the name of the data's label column"), ("text", "as text-column does")],
)
def test_column_keys_must_name_one_column_each(value, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        FedConfig.from_run_config({"label-column": value})
    assert info.value.key == "label-column"


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "x.csv").touch()
    error = load_error(tmp_path / "x.csv")
    assert error.key == "dataset"
    assert str(error).endswith(
        "x.csv' is empty; give a file with a header row and at least one row per client"
    )


@pytest.mark.parametrize("form", [".csv", ".tsv", ".parquet"])
def test_a_file_with_a_header_and_no_rows_says_so(tmp_path, form):
    path = write(tmp_path, form, {"text": [], "label": []})
    error = load_error(path)
    assert error.key == "dataset"
    assert str(error).endswith(
        f"data{form}' has a header but no rows; give at least one row per client"
    )


def test_a_missing_column_names_its_key(tmp_path):
    error = load_error(write(tmp_path, ".csv", {"text": CLASSIFICATION["text"]}))
    assert error.key == "label-column"
    assert "has columns ['text'] but no 'label' column; add it, or name the column that " in str(
        error
    )


def test_wrong_column_names_list_the_columns_and_the_keys(tmp_path):
    path = write(tmp_path, ".csv", {"body": ["a"] * 4, "topic": ["b"] * 4})
    error = load_error(path)
    assert error.key == "dataset"
    assert str(error).endswith(
        "data.csv' has columns ['body', 'topic']; name the text and label columns with "
        "text-column= and label-column= (classification), or instruction-column= and "
        "response-column= (instruction tuning)"
    )


def test_an_unknown_suffix_lists_the_accepted_forms(tmp_path):
    (tmp_path / "data.xlsx").write_text("text,label\n")
    error = load_error(tmp_path / "data.xlsx")
    assert error.key == "dataset"
    assert "its suffix '.xlsx' is not one of .json, .jsonl, .csv, .tsv, .parquet; give a " in (
        str(error)
    )


def test_an_unreadable_file_gives_the_parsers_message(tmp_path):
    (tmp_path / "data.csv").write_text('text,label\n"an open quote,1\n')
    (tmp_path / "data.parquet").write_text("text,label\n")
    for name, parser_message in (("data.csv", "ParserError: "), ("data.parquet", "ArrowInvalid")):
        error = load_error(tmp_path / name)
        assert error.key == "dataset"
        assert f"cannot read '{tmp_path / name}': {parser_message}" in str(error)


def test_a_save_to_disk_folder_without_train_lists_its_splits(tmp_path):
    only = datasets.Dataset.from_dict(CLASSIFICATION)
    datasets.DatasetDict({"validation": only, "test": only}).save_to_disk(tmp_path / "saved")
    error = load_error(tmp_path / "saved")
    assert error.key == "dataset"
    assert str(error).endswith(
        "saved' holds the splits ['validation', 'test'] but no 'train'; save the training "
        "rows as the 'train' split"
    )
    (tmp_path / "plain").mkdir()
    assert "was not written by datasets' save_to_disk" in str(load_error(tmp_path / "plain"))


@pytest.mark.parametrize("form", [".parquet", "save_to_disk"])
def test_a_client_gets_its_examples_from_parquet_and_saved_folders(tmp_path, form, tokenizer):
    path = str(write(tmp_path, form, CLASSIFICATION))
    data = load_client_data(path, "iid", 1, 2, 0.2, 0, tokenizer, 16)
    assert data.num_labels == 2 and (data.num_train, data.num_test) == (4, 2)
    assert set(data.train["labels"] + data.test["labels"]) <= {0, 1}


# ------------------------------------------------------- labels and incomplete rows
def test_integer_labels_keep_their_numeric_order(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate([11, 3, 7, 3])))
    dataset = load_labelled_dataset(str(path))
    assert dataset.features["label"].names == ["3", "7", "11"]  # not text order '11', '3', '7'
    assert dataset["label"] == [2, 0, 1, 0]
    quoted = tmp_path / "quoted.jsonl"  # numbers written as text sort the same way
    quoted.write_text(
        "".join(f'{{"text": "t{i}", "label": "{v}"}}\n' for i, v in enumerate([10, 9]))
    )
    assert load_labelled_dataset(str(quoted)).features["label"].names == ["9", "10"]
    words = tmp_path / "words.csv"  # names stay in the order class_encode_column gives
    words.write_text("text,label\na,tech\nb,arts\nc,sport\n")
    assert load_labelled_dataset(str(words)).features["label"].names == ["arts", "sport", "tech"]


def test_incomplete_rows_are_named_or_dropped_on_request(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\nfirst,x\n,y\nthird,\nfourth,y\n")
    error = load_error(path)
    assert error.key == "dataset"
    assert "2 of 4 rows with an empty or missing 'text' or 'label' (rows 2, 3," in error.problem
    assert "drop-incomplete-rows=true" in error.problem
    kept = load_labelled_dataset(str(path), DEFAULT_COLUMNS, True)
    assert kept["text"] == ["first", "fourth"]
    instructions = tmp_path / "qa.jsonl"
    instructions.write_text(
        '{"instruction": "q1", "response": "a1"}\n{"instruction": "q2", "response": " "}\n'
    )
    assert "missing 'response' (row 2," in load_error(instructions).problem


def test_a_file_that_is_not_utf8_is_refused_with_the_byte(tmp_path):
    for suffix in (".csv", ".jsonl"):
        path = tmp_path / f"latin{suffix}"
        text = (
            "text,label\ncaf\xe9,x\n" if suffix == ".csv" else '{"text": "caf\xe9", "label": "x"}\n'
        )
        path.write_bytes(text.encode("latin-1"))
        error = load_error(path)
        assert error.key == "dataset" and "is not UTF-8 text" in error.problem, error.problem
        assert error.problem.endswith("save it as UTF-8")
    marked = tmp_path / "bom.csv"  # a byte-order mark is UTF-8 too
    marked.write_bytes("text,label\na,x\nb,y\n".encode("utf-8-sig"))
    assert rows(marked) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
