"""A user's own models and data, through the whole app.

- The first-hour mistakes: each stops the run before any training with one headline,
  ``run-config '<key>': <problem and fix>``, in summary.json and as the console's last
  line (in process: the ServerApp, the strategy and the ClientApps; one under Ray).
- Tiny runs on local models of other families (GPT-2's Conv1D projections, DistilBERT,
  Qwen2) with Fed-ALoRA and a zero-padding method, on Parquet, save_to_disk and
  renamed-column JSONL data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from fedalora.data import load_labelled_dataset
from fedalora.errors import ConfigError
from fedalora.outputs import read_jsonl
from server.in_process import run_in_process

from .local_models import save_tiny_model

APP = Path(__file__).resolve().parents[1]
TINY = {
    "num-hidden-layers": 1,
    "local-steps": 1,
    "batch-size": 4,
    "max-length": 24,
    "max-new-tokens": 2,
    "ranks": "8,4,2",
}
NODES = 3


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _folder(path: Path) -> str:
    path.mkdir()
    return str(path)


def _without_tokenizer(folder: Path) -> str:
    """A model folder as saved without its tokenizer (config and weights only)."""
    for item in folder.iterdir():
        if item.name not in ("config.json", "model.safetensors", "generation_config.json"):
            item.unlink()
    return str(folder)


def _news_csv(path: Path, labels: list[str], texts: list[str] | None = None) -> str:
    texts = texts or [f"story {i} about {label or 'nothing'}" for i, label in enumerate(labels)]
    rows = "".join(f"{t},{label}\n" for t, label in zip(texts, labels, strict=True))
    return _write(path, "text,label\n" + rows)


def _smollm2_vocabulary() -> int:
    from fedalora.models import load_tokenizer, model_source

    return len(load_tokenizer("smollm2", model_source("smollm2")))


INCOMPLETE = "fill them in or drop them, or set drop-incomplete-rows=true to leave them out"


#: mistake -> (run-config it makes under tmp, key, the headline's problem and fix).
Mistake = Callable[[Path], tuple[dict[str, str], str, str]]
MISTAKES: dict[str, Mistake] = {
    "empty file": lambda tmp: (
        {"dataset": (p := _write(tmp / "empty.csv", ""))},
        "dataset",
        f"the file '{p}' is empty; give a file with a header row and at least one row per client",
    ),
    "header-only file": lambda tmp: (
        {"dataset": (p := _write(tmp / "header.csv", "text,label\n"))},
        "dataset",
        f"the file '{p}' has a header but no rows; give at least one row per client",
    ),
    "missing column": lambda tmp: (
        {"dataset": (p := _write(tmp / "texts.csv", "text\nfirst\nsecond\nthird\n"))},
        "label-column",
        f"'{p}' has columns ['text'] but no 'label' column; add it, or name the column "
        "that holds the labels with label-column=",
    ),
    "wrong column names": lambda tmp: (
        {"dataset": (p := _write(tmp / "news.csv", "body,topic\na,x\nb,y\nc,x\nd,y\n"))},
        "dataset",
        f"'{p}' has columns ['body', 'topic']; name the text and label columns with "
        "text-column= and label-column= (classification), or instruction-column= and "
        "response-column= (instruction tuning)",
    ),
    "non-existent model path": lambda tmp: (
        {"model": (p := str(tmp / "models" / "mine"))},
        "model",
        f"the path '{p}' does not exist; give an existing model folder (with config.json), "
        "a packaged model (minilm, smollm2) or a model id",
    ),
    "folder that is not a model": lambda tmp: (
        {"model": (p := _folder(tmp / "not-a-model"))},
        "model",
        f"the folder '{p}' has no config.json, so it is not a saved model; give the folder "
        "that save_pretrained wrote",
    ),
    "file given as a model": lambda tmp: (
        {"model": (p := _write(tmp / "model.safetensors", "x"))},
        "model",
        f"'{p}' is a file; give the model's folder (with config.json)",
    ),
    "rank above the model's layers": lambda tmp: (
        {"ranks": "8,4,999"},
        "ranks",
        "rank 999 exceeds the smallest adapted layer dimension (384); use a rank <= 384",
    ),
    "unknown target module": lambda tmp: (
        {"target-modules": "q_proj,v_proj"},
        "target-modules",
        "no linear layer of the model is named ['q_proj', 'v_proj']; this model's linear "
        "layers are named classifier, dense, key, query, value",
    ),
    "auto on a family without a default": lambda tmp: (
        {"model": str(save_tiny_model("distilbert", tmp / "distilbert", num_labels=5))},
        "target-modules",
        "no default for model type 'distilbert'; name the layers to adapt, from this "
        "model's linear layers: classifier, k_lin, lin1, lin2, out_lin, pre_classifier, "
        "q_lin, v_lin",
    ),
    "label-count mismatch": lambda tmp: (
        {
            "model": str(save_tiny_model("distilbert", tmp / "three-labels", num_labels=3)),
            "target-modules": "q_lin,v_lin",
        },
        "model",
        "the checkpoint's classifier has 3 labels, the data set has 5; set reinit-head=true "
        "to train a new head from scratch (the checkpoint's head is dropped), or give data "
        "with 3 labels",
    ),
    "model without a tokenizer": lambda tmp: (
        {"model": (p := _without_tokenizer(save_tiny_model("gpt2", tmp / "gpt2", num_labels=5)))},
        "model",
        f"the folder '{p}' has no tokenizer (none of tokenizer.json, vocab.txt, vocab.json, "
        "spiece.model, sentencepiece.bpe.model, tokenizer.model); save the model's tokenizer "
        "there (tokenizer.save_pretrained), or point tokenizer= at a folder or id that has it",
    ),
    "tokenizer that does not fit the model": lambda tmp: (
        {"model": (p := str(save_tiny_model("gpt2", tmp / "gpt2", 5, vocab_size=1000)))},
        "model",
        f"the tokenizer of '{p}' has {_smollm2_vocabulary()} tokens and the model's embedding "
        "1000 rows (more tokens than the model can embed), so it is not this model's "
        "tokenizer; save the tokenizer the model was trained with beside it, or point "
        "tokenizer= at it",
    ),
    "encoder-decoder model": lambda tmp: (
        {"model": (p := str(save_tiny_model("t5", tmp / "t5", num_labels=5)))},
        "model",
        f"'{p}' is a t5 model, an encoder-decoder; fedalora fine-tunes encoder-only models "
        "(BERT-like) as classifiers and decoder-only models (GPT-, Llama-like) as classifiers "
        "or on instruction data",
    ),
    "max-length past the model's positions": lambda tmp: (
        {"model": (p := str(save_tiny_model("gpt2", tmp / "gpt2", 5))), "max-length": 200},
        "max-length",
        f"200 tokens exceed the 128 positions the model '{p}' can embed; use max-length <= 128",
    ),
    "missing labels": lambda tmp: (
        {"dataset": (p := _news_csv(tmp / "labels.csv", ["x", "", "y", "x", "", "y"]))},
        "dataset",
        f"'{p}' has 2 of 6 rows with an empty or missing 'label' (rows 2, 5, counting data "
        f"rows from 1); {INCOMPLETE}",
    ),
    "empty text cells": lambda tmp: (
        {
            "dataset": (
                p := _news_csv(tmp / "texts.csv", ["x", "y", "x", "y"], ["", "b", "  ", "d"])
            ),
            "text-column": "text",
        },
        "dataset",
        f"'{p}' has 2 of 4 rows with an empty or missing 'text' (rows 1, 3, counting data "
        f"rows from 1); {INCOMPLETE}",
    ),
    "a Dirichlet split that cannot be drawn": lambda tmp: (
        {
            "dataset": _news_csv(tmp / "skewed.csv", ["a"] * 34 + ["b", "b", "c", "c", "d", "d"]),
            "partitioning": "dirichlet:0.01",
        },
        "partitioning",
        "'dirichlet:0.01' could not split the 40 examples (4 classes) into 3 parts of a useful "
        "size (flwr-datasets gave up drawing); use a larger alpha (e.g. 'dirichlet:1.0'), "
        "fewer clients, or 'iid'",
    ),
}


def _run_config(values: Mapping[str, object]) -> str:
    """``--run-config`` text of the tiny runs' values with ``values`` over them."""
    merged = {**TINY, **values}
    return " ".join(
        f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}"
        for key, value in merged.items()
    )


def _console(tmp_path: Path, run_config: str, *launcher: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedalora.launch.simulate",
            *launcher,
            "--run-name",
            "console",
            "--num-supernodes",
            str(NODES),
            "--output-dir",
            str(tmp_path / "outputs"),
            "--run-config",
            run_config,
        ],
        cwd=APP,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def console_run(tmp_path: Path, mistake: str, *launcher: str) -> tuple[list[str], dict, str]:
    """Run the console launcher on a mistake: its output lines, summary.json and the
    headline expected (without the nodes that reported it)."""
    values, key, problem = MISTAKES[mistake](tmp_path)
    run = _console(tmp_path, _run_config(values), *launcher)
    assert run.returncode == 1, run.stderr[-2000:]
    run_dir = tmp_path / "outputs" / "console"
    assert not (run_dir / "metrics.jsonl").exists()  # no client trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_key"] == key
    return (run.stdout + run.stderr).strip().splitlines(), summary, f"run-config '{key}': {problem}"


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_user_mistake_stops_before_training_naming_its_key(tmp_path, mistake):
    """The ServerApp, strategy and ClientApps in this process: the run fails before any
    client trains, with the mistake's key and fix as its error (the nodes' own errors
    name the nodes that reported them, once)."""
    values, key, problem = MISTAKES[mistake](tmp_path)
    headline = f"run-config '{key}': {problem}"
    with pytest.raises(ConfigError) as raised:
        run_in_process(
            APP,
            "mistake",
            num_supernodes=NODES,
            run_config=_run_config(values),
            output_dir=tmp_path / "outputs",
        )
    run_dir = tmp_path / "outputs" / "mistake"
    assert not (run_dir / "metrics.jsonl").exists()  # no client trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_key"] == key
    assert summary["error"] == str(raised.value)
    assert summary["error"] in (headline, f"{headline} [reported by 3 of 3 nodes: 100, 101, 102]")


@pytest.mark.parametrize("mistake", ["missing column", "non-existent model path"])
def test_the_console_shows_a_mistake_as_its_headline_and_nothing_else(tmp_path, mistake):
    """Through the console launcher (``--in-process``): the console shows where Flower's
    log went and the headline, nothing else."""
    lines, summary, headline = console_run(tmp_path, mistake, "--in-process")
    assert summary["error"] in (headline, f"{headline} [reported by 3 of 3 nodes: 100, 101, 102]")
    log = tmp_path / "outputs" / "console" / "flower.log"
    assert lines == [
        f"run 'console': Flower's log in {log}",
        f"run 'console' failed: {summary['error']}",
    ]


@pytest.mark.parametrize("launcher", [("--in-process",), ()], ids=["in-process", "ray"])
def test_a_run_config_typo_is_named_with_the_closest_key_before_anything_starts(tmp_path, launcher):
    """Both launchers check the keys before a SuperLink, Ray or any client starts."""
    run = _console(tmp_path, "num-server-round=2 ranks='8'", *launcher)
    headline = (
        "run-config 'num-server-round': unknown key; did you mean 'num-server-rounds'? the keys "
        "are those of pyproject.toml's [tool.flwr.app.config] (docs/configuration.md)"
    )
    assert run.returncode == 1
    assert (run.stdout + run.stderr).strip().splitlines() == [f"run 'console' failed: {headline}"]
    summary = json.loads((tmp_path / "outputs" / "console" / "summary.json").read_text())
    assert summary == {"status": "failed", "error": headline, "error_key": "num-server-round"}


def test_a_run_in_which_no_client_trained_fails_with_the_clients_own_error(tmp_path):
    """Every train reply fails (the clients' upload raises): no round is aggregated, so
    the run is not "completed" with null figures but failed, with that error."""
    from .failing_method import FAILURE

    run = _console(
        tmp_path,
        _run_config(
            {
                "strategy": "tests.failing_method:FailingUpload",
                "ranks": "4",
                "num-server-rounds": 1,
                "round-retries": 0,
            }
        ),
        "--in-process",
    )
    headline = f"no round trained: clients 0, 1, 2: train failed: RuntimeError: {FAILURE}"
    assert run.returncode == 1
    assert (run.stdout + run.stderr).strip().splitlines()[-1] == f"run 'console' failed: {headline}"
    run_dir = tmp_path / "outputs" / "console"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == headline
    assert "error_key" not in summary
    assert [row["skipped"] for row in read_jsonl(run_dir / "rounds.jsonl")] == [True]


def test_the_console_follows_a_run_a_line_per_round_and_its_warnings(tmp_path):
    from fedalora.launch import RunFollower

    stale = {"round": 1, "local_model_mean_accuracy": 0.1, "local_model_worst_accuracy": 0.0}
    (tmp_path / "rounds.jsonl").write_text(json.dumps(stale) + "\n")  # an earlier run's
    lines: list[str] = []
    follower = RunFollower(tmp_path, lines.append)
    follower.poll()
    assert lines == []
    (tmp_path / "rounds.jsonl").unlink()  # the new run starts its records afresh
    (tmp_path / "config.json").write_text(json.dumps({"num-server-rounds": 2}))
    row = {
        "round": 1,
        "local_model_mean_accuracy": 0.5,
        "local_model_worst_accuracy": 0.25,
        "evaluate_mean_accuracy": None,
        "failed": 1,
        "rejected": 0,
        "seconds": 12.4,
    }
    with (tmp_path / "rounds.jsonl").open("a") as rounds:
        rounds.write(json.dumps(row) + "\n" + '{"round": 2, "local_mo')  # mid-write
    (tmp_path / "warnings.log").write_text("round 1: node 7 (client 2): train failed: x\n")
    follower.poll()
    follower.poll()
    assert lines == [
        "warning: round 1: node 7 (client 2): train failed: x",
        "round 1/2 | local models: accuracy mean 0.500, worst 0.250 | 1 failed | 12 s",
    ]


def test_the_console_names_the_metric_of_instruction_runs():
    from fedalora.outputs import progress_line

    row = {
        "round": 2,
        "metric": "rouge1",
        "local_model_mean_rouge1": 0.25,
        "local_model_worst_rouge1": 0.125,
        "evaluate_mean_rouge1": 0.5,
        "evaluate_worst_rouge1": 0.375,
        "seconds": 3.0,
    }
    assert progress_line(row, 2) == (
        "round 2/2 | local models: rouge1 mean 0.250, worst 0.125 | after aggregation: "
        "rouge1 mean 0.500, worst 0.375 | 3 s"
    )


# ------------------------------------------------------------- other model families
def _classification_rows(count: int) -> list[dict]:
    data = load_labelled_dataset("bbc-news").shuffle(seed=0).select(range(count))
    names = data.features["label"].names
    return [{"text": r["text"][:300], "label": names[r["label"]]} for r in data]


def _instruction_rows(count: int) -> list[dict]:
    data = load_labelled_dataset("instructions").shuffle(seed=0).select(range(count))
    return [{"prompt": r["instruction"][:200], "answer": r["response"]} for r in data]


def _parquet(tmp: Path) -> tuple[str, str]:
    import datasets

    path = tmp / "news.parquet"
    datasets.Dataset.from_list(_classification_rows(60)).to_parquet(str(path))
    return str(path), ""


def _saved(tmp: Path) -> tuple[str, str]:
    import datasets

    folder = tmp / "news-saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_classification_rows(60))}
    ).save_to_disk(str(folder))
    return str(folder), ""


def _saved_instructions(tmp: Path) -> tuple[str, str]:
    import datasets

    folder = tmp / "qa-saved"
    rows = [{"instruction": r["prompt"], "response": r["answer"]} for r in _instruction_rows(45)]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return str(folder), ""


def _renamed_jsonl(tmp: Path) -> tuple[str, str]:
    path = tmp / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _instruction_rows(45)) + "\n")
    return str(path), "instruction-column='prompt' response-column='answer'"


#: family -> (its adapted layers, extra run-config, [(method, data), ...]).
FAMILIES = {
    "gpt2": ({"c_attn"}, "", [("fedalora-hetero", _parquet), ("zeropad", _saved)]),
    "distilbert": (
        {"q_lin", "v_lin"},
        "target-modules='q_lin,v_lin'",
        [("fedalora-hetero", _saved), ("hetlora", _parquet)],
    ),
    "qwen2": (
        {"q_proj", "v_proj"},
        "",
        [("fedalora-hetero", _saved_instructions), ("zeropad", _renamed_jsonl)],
    ),
}
FAMILY_RUNS = [
    (family, method, data) for family, (_, _, runs) in FAMILIES.items() for method, data in runs
]


@pytest.mark.parametrize(
    ("family", "method", "data"),
    FAMILY_RUNS,
    ids=[f"{f}-{m}-{d.__name__.strip('_')}" for f, m, d in FAMILY_RUNS],
)
def test_a_local_model_of_another_family_trains_end_to_end(tmp_path, family, method, data):
    layers, extra, _ = FAMILIES[family]
    instruction = family == "qwen2"
    model = save_tiny_model(family, tmp_path / family, num_labels=0 if instruction else 5)
    dataset, columns = data(tmp_path)
    options = "intermediate-rank=4" if method == "fedalora-hetero" else ""
    run_dir = run_in_process(
        APP,
        f"{family}-{method}",
        num_supernodes=NODES,
        output_dir=tmp_path / "outputs",
        run_config=(
            f"{_run_config({'num-server-rounds': 2, 'strategy': method, 'model': str(model)})} "
            f"{options} dataset='{dataset}' partitioning='iid' {extra} {columns}"
        ),
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    metric = "rouge1" if instruction else "accuracy"  # the score clients are ranked by
    assert summary["metric"] == config["metric"] == metric
    assert summary[f"final_local_model_mean_{metric}"] is not None
    assert {name.rsplit(".", 1)[-1] for name in config["adapted_layers"]} == layers
    assert [r["rejected"] + r["failed"] for r in read_jsonl(run_dir / "rounds.jsonl")] == [0, 0]
    for client in range(NODES):
        assert (run_dir / "clients" / str(client) / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("method", ["fedalora-hetero", "zeropad"])
def test_a_4bit_run_completes_on_cpu(tmp_path, method):
    """QLoRA's NF4 base under the whole app: every client trains, uploads and exports."""
    options = "intermediate-rank=4" if method == "fedalora-hetero" else ""
    run_dir = run_in_process(
        APP,
        f"4bit-{method}",
        num_supernodes=NODES,
        output_dir=tmp_path,
        run_config=_run_config({"num-server-rounds": 2, "strategy": method, "quantization": "4bit"})
        + f" {options}",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert json.loads((run_dir / "config.json").read_text())["quantization"] == "4bit"
    assert [r["rejected"] + r["failed"] for r in read_jsonl(run_dir / "rounds.jsonl")] == [0, 0]
    assert len(list(run_dir.glob("clients/*/adapter/adapter_model.safetensors"))) == NODES


def test_a_checkpoint_with_a_fresh_head_trains_it_and_records_the_numeric_label_map(tmp_path):
    """A classifier saved with a fresh head (AutoModelForSequenceClassification, never
    trained) has that head trained, so accuracy rises over rounds; integer labels keep
    their numeric order (3, 7, 11, not '11', '3', '7') in config.json and the exports."""
    import torch
    from safetensors.torch import load_file

    from fedalora.models import load_base_model

    fresh = load_base_model("minilm", 3, num_hidden_layers=2, seed=1)
    folder = tmp_path / "minilm-classifier"
    fresh.model.save_pretrained(folder)
    fresh.tokenizer.save_pretrained(folder)
    news = load_labelled_dataset("bbc-news").shuffle(seed=0)
    names = news.features["label"].names
    as_number = {"business": 11, "sports": 3, "tech": 7}
    rows = [
        {"text": r["text"][:400], "label": as_number[names[r["label"]]]}
        for r in news
        if names[r["label"]] in as_number
    ][:240]
    dataset = tmp_path / "numeric.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = run_in_process(
        APP,
        "fresh-head",
        num_supernodes=NODES,
        output_dir=tmp_path / "outputs",
        run_config=(
            f"model='{folder}' dataset='{dataset}' partitioning='iid' ranks='8' "
            "strategy='fedalora' num-server-rounds=3 local-steps=8 test-fraction=0.3 lr=0.01 "
            "max-length=48"
        ),
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "3", "1": "7", "2": "11"}
    assert config["label2id"] == {"3": 0, "7": 1, "11": 2}
    assert config["trained_head"] == ["classifier"]
    exported = run_dir / "clients" / "0" / "adapter"
    assert json.loads((exported / "labels.json").read_text())["id2label"] == config["id2label"]
    head = {
        k: v
        for k, v in load_file(exported / "adapter_model.safetensors").items()
        if "classifier" in k
    }
    assert head and not any(
        torch.allclose(v, fresh.model.classifier.weight) for v in head.values() if v.dim() == 2
    )
    scores = [r["local_model_mean_accuracy"] for r in read_jsonl(run_dir / "rounds.jsonl")]
    assert scores[-1] > scores[0], scores
