"""The instruction track: the packaged tasks, prompt masking, generation scores, and a
real SmolLM2 client (cut to 2 layers) that trains and answers."""

import json

import numpy as np
import pytest
import torch

from fedalora.client import FederatedClient
from fedalora.config import ConfigError
from fedalora.data import (
    IGNORE,
    collate,
    load_client_data,
    load_labelled_dataset,
    load_official_test,
)
from fedalora.instructions import TASKS
from fedalora.metrics import exact_match, generation_scores, rouge1
from fedalora.models import load_base_model
from fedalora.training import count_hits

from .conftest import tiny_config


def test_rouge1_and_exact_match_by_hand():
    # prediction tokens: the cat sat; reference: the cat sat down -> P=3/3, R=3/4
    assert rouge1("The cat sat.", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # clipped counts
    assert rouge1("", "anything") == 0.0
    assert exact_match("Sports!", "sports") == 1.0 and exact_match("sport", "sports") == 0.0
    scores = generation_scores(["95", "the cat"], ["95", "a cat"])
    assert scores == {"rouge1": pytest.approx((1 + 0.5) / 2), "exact_match": 0.5}
    with pytest.raises(ValueError):
        generation_scores(["a"], [])


def test_the_packaged_set_has_eight_tasks_one_per_client():
    dataset = load_labelled_dataset("instructions")
    assert set(dataset["task"]) == set(TASKS) and len(TASKS) >= 8
    base = load_base_model("smollm2", 0, num_hidden_layers=2)
    seen = set()
    for partition_id in range(len(TASKS)):
        data = load_client_data(
            "instructions", "task", partition_id, len(TASKS), 0.1, 0, base.tokenizer, 64
        )
        tasks = {
            t
            for t, r in zip(dataset["task"], dataset["response"], strict=True)
            if r in set(data.test["references"])
        }
        assert data.num_labels == 0 and data.num_train > 0 and data.num_test > 0
        seen.add(frozenset(tasks))
    assert len(seen) == len(TASKS)  # every client got a different task


def test_the_prompt_is_masked_out_of_the_loss():
    base = load_base_model("smollm2", 0, num_hidden_layers=2)
    data = load_client_data("instructions", "task", 0, len(TASKS), 0.1, 0, base.tokenizer, 48)
    for ids, labels, prompt in zip(
        data.train["input_ids"][:20],
        data.train["labels"][:20],
        data.train["prompt_ids"][:20],
        strict=True,
    ):
        assert len(ids) == len(labels) <= 48 and ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]  # the response (and eos) is learned
        assert ids[-1] == base.tokenizer.eos_token_id
    batch = collate(data.train, [0, 1, 2], base.tokenizer, torch.device("cpu"))
    lengths = [len(data.train["input_ids"][i]) for i in range(3)]
    for row, length in enumerate(lengths):  # padding is ignored too
        assert (batch["labels"][row, length:] == IGNORE).all()
        assert batch["attention_mask"][row].sum() == length
    logits = torch.zeros(*batch["labels"].shape, base.model.config.vocab_size)
    counted = count_hits(logits, batch["labels"])[1]
    assert counted == sum(
        len(data.train["labels"][i]) - len(data.train["prompt_ids"][i]) for i in range(3)
    )


def test_an_instruction_client_trains_and_scores_its_answers():
    config = tiny_config(
        strategy="fedalora",
        ranks="4",
        model="smollm2",
        dataset="instructions",
        partitioning="task",
        max_length=48,
        max_new_tokens=3,
        test_fraction=0.02,
        batch_size=4,
        local_steps=2,
    )
    client = FederatedClient(config, 0, len(TASKS), 4)
    assert client.base.head_modules == []  # a causal LM: no new head
    shared = {
        f"{m}.lora_B": np.zeros((d_out, 4), np.float32)
        for m, (d_out, _) in client.base.layer_shapes().items()
    }
    upload, private, metrics, _ = client.train(shared, None, 1)
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    assert set(upload) == set(shared)
    scores, _ = client.evaluate(upload, private, 1)
    assert {"rouge1", "exact_match", "loss", "accuracy"} <= set(scores)
    assert all(0 <= scores[k] <= 1 for k in ("rouge1", "exact_match"))


def test_instruction_data_refuses_label_partitioning():
    config = tiny_config(
        strategy="fedalora",
        ranks="4",
        model="smollm2",
        dataset="instructions",
        partitioning="dirichlet:0.5",
    )
    with pytest.raises(ConfigError, match="partitioning"):
        FederatedClient(config, 0, 8, 4)


def test_local_instruction_files_work_like_the_packaged_set(tmp_path):
    rows = [{"instruction": f"Compute {i} + 1.", "response": str(i + 1)} for i in range(20)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    base = load_base_model("smollm2", 0, num_hidden_layers=2)
    data = load_client_data(str(path), "iid", 1, 2, 0.2, 0, base.tokenizer, 32)
    assert data.num_labels == 0 and data.num_train == 8 and data.num_test == 2
    assert all(r.isdigit() for r in data.test["references"])


def test_official_test_split_uses_the_training_label_order():
    base = load_base_model("minilm", 20, num_hidden_layers=1)
    official = load_official_test("20newsgroups", 200, 0, base.tokenizer, 32)
    assert len(official["labels"]) == 200 and set(official["labels"]) <= set(range(20))
    assert len(set(official["labels"])) > 10  # a sample across the topics
    with pytest.raises(ConfigError, match="global-test-examples"):
        load_official_test("bbc-news", 10, 0, base.tokenizer, 32)
