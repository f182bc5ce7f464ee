"""Property: whatever small data file a user gives, in any supported format and with any
mix of common defects, a run either trains or stops before training with a ConfigError
that names ``dataset``, ``partitioning`` or a ``*-column`` key. Never a crash headlined
under a key that does not exist, never "completed" without a trained round.

Each example is a whole federation in process (the ServerApp, the strategy and three
ClientApps) on a one-layer MiniLM, one round of one step.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedalora.errors import ConfigError, RunFailed
from fedalora.outputs import read_jsonl
from server.in_process import run_in_process

APP = Path(__file__).resolve().parents[1]
FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", "save_to_disk")
TEXT_FORMATS = (".csv", ".tsv", ".jsonl", ".json")
WORDS = ("market", "goal", "vote", "film", "chip", "rate", "match", "poll", "song", "code")
KEYS_OF_DATA = {"dataset", "partitioning"}
TINY = (
    "num-hidden-layers=1 local-steps=1 batch-size=4 max-length=16 ranks='4,2,2' "
    "intermediate-rank=2 num-server-rounds=1 round-retries=0 export-adapters=false "
    "checkpoint=false test-fraction=0.3"
)
_counter = itertools.count()


@st.composite
def data_files(draw: st.DrawFn) -> dict:
    """A small classification data set and the defects to write it with."""
    size = draw(st.integers(min_value=4, max_value=24))
    numeric = draw(st.booleans())
    classes = draw(st.integers(min_value=1, max_value=4))
    label_values = (
        [3, 7, 11, 20][:classes] if numeric else ["sport", "tech", "arts", "news"][:classes]
    )
    rows = [
        {
            "text": " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))),
            "label": draw(st.sampled_from(label_values)),
        }
        for _ in range(size)
    ]
    if draw(st.booleans()):  # a class with a single row
        rows.append({"text": "lonely example", "label": 99 if numeric else "rare"})
    return {
        "rows": rows,
        "format": draw(st.sampled_from(FORMATS)),
        "empty_text": draw(st.sets(st.integers(0, len(rows) - 1), max_size=2)),
        "missing_label": draw(st.sets(st.integers(0, len(rows) - 1), max_size=2)),
        "renamed": draw(st.sampled_from([None, "text", "label"])),
        "rename_key_given": draw(st.booleans()),
        "dropped": draw(st.sampled_from([None, None, "label"])),
        "encoding": draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1"])),
        "crlf": draw(st.booleans()),
        "partitioning": draw(st.sampled_from(["iid", "dirichlet:0.5", "dirichlet:0.05"])),
        "drop_incomplete": draw(st.booleans()),
    }


def _write(case: dict, folder: Path) -> tuple[str, str]:
    """Write the case's file; returns its path and the run-config keys it needs."""
    names = {"text": "text", "label": "label"}
    if case["renamed"]:
        names[case["renamed"]] = f"my_{case['renamed']}"
    rows = []
    for i, row in enumerate(case["rows"]):
        text = "  " if i in case["empty_text"] else row["text"]
        if case["encoding"] == "latin-1" and i == 0:
            text += " café"  # a byte that is not UTF-8
        cells = {names["text"]: text, names["label"]: row["label"]}
        if i in case["missing_label"]:
            cells[names["label"]] = None
        if case["dropped"]:
            cells.pop(names[case["dropped"]])
        rows.append(cells)
    form = case["format"]
    path = folder / ("data" + (form if form.startswith(".") else ""))
    if form in (".csv", ".tsv"):
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer,
            fieldnames=list(rows[0]),
            delimiter="," if form == ".csv" else "\t",
            lineterminator="\r\n" if case["crlf"] else "\n",
        )
        writer.writeheader()
        writer.writerows(rows)
        path.write_bytes(buffer.getvalue().encode(case["encoding"]))
    elif form in (".jsonl", ".json"):
        newline = "\r\n" if case["crlf"] else "\n"
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        text = newline.join(lines) if form == ".jsonl" else "[" + ("," + newline).join(lines) + "]"
        path.write_bytes(text.encode(case["encoding"]))
    elif form == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    keys = ""
    if case["renamed"] and case["rename_key_given"]:
        keys = f"{case['renamed']}-column='{names[case['renamed']]}'"
    return str(path), keys


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=data_files())
def test_any_data_file_trains_or_is_refused_before_training_by_a_data_key(tmp_path, case):
    folder = tmp_path / f"case-{next(_counter)}"
    folder.mkdir()
    dataset, keys = _write(case, folder)
    run_config = (
        f"{TINY} dataset='{dataset}' partitioning='{case['partitioning']}' {keys} "
        f"drop-incomplete-rows={str(case['drop_incomplete']).lower()}"
    )
    try:
        run_dir = run_in_process(
            APP, "run", num_supernodes=3, output_dir=folder, run_config=run_config
        )
    except ConfigError as exc:
        run_dir = folder / "run"
        assert exc.key in KEYS_OF_DATA or exc.key.endswith("-column"), str(exc)
    except RunFailed as exc:
        pytest.fail(f"a client crashed instead of naming the data's mistake: {exc}")
    summary = json.loads((run_dir / "summary.json").read_text())
    event(f"{summary['status']} {summary.get('error_key', '')}".strip())
    if summary["status"] == "completed":
        assert summary["trained_rounds"] == 1
        trained = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train"]
        assert trained and all(r["num_examples"] > 0 for r in trained)
    else:
        key = summary["error_key"]
        assert key in KEYS_OF_DATA or key.endswith("-column"), summary["error"]
        assert summary["error"].startswith(f"run-config '{key}': ")
        assert not (run_dir / "metrics.jsonl").exists()  # refused before training
