"""Cohorts in the core: clients trained together in one batched pass over one base get
exactly the round each gets alone (dropout off), and are scored as each is alone; the
adapters that cannot be batched say why and train one after another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedalora.client import (
    FederatedClient,
    TrainResult,
    cohort_model,
    score_cohort,
    train_cohort,
)
from fedalora.cohort import CohortModel, concatenate, prompts_per_client
from fedalora.data import IGNORE, collate
from fedalora.methods import Participant

from .conftest import dropout_off, tiny_config

RTOL, ATOL = 1e-5, 1e-6
#: (strategy, ranks, extra run-config): one round from real round-2 inputs, uploads and
#: private states compared directly, for the machinery a cohort must get right beyond
#: PEFT's LoRA layer (``tests/test_cohort_runs.py`` runs every method and variant):
#: Fed-ALoRA's decomposed layer, FLoRA's merged update, HetLoRA's penalty and rank cut,
#: LoRI's masks.
CASES = [
    ("fedalora-hetero", "8,4,2", {}),
    ("hetlora", "8,4,2", {"rank-decay": 0.5, "rank-penalty": 0.1}),
    ("flora", "8,4,2", {}),
    ("lori", "8,4,2", {"lori-sparsity": 0.5, "lori-calibration-rounds": 1}),
]


@pytest.fixture
def no_dropout() -> Iterator[None]:
    """The cached tiny base without dropout: exactness is a property of the dropout-free
    run."""
    with dropout_off(FederatedClient(tiny_config(), 0, 3, 2).base.model):
        yield


def _clients(strategy: str, ranks: str, extra: dict) -> list[FederatedClient]:
    config = tiny_config(
        strategy=strategy, ranks=ranks, lora_dropout=0.0, test_fraction=0.05, **extra
    )
    return [FederatedClient(config, p, 3, config.run.rank_for(p)) for p in range(3)]


def _round_two_inputs(clients: list[FederatedClient]) -> tuple[list, list]:
    """Each client's shared state and private state for round 2, after a real round 1
    trained alone and aggregated (so merged updates, masks and shared factors are
    non-trivial)."""
    method, layers = clients[0].method, clients[0].base.layer_shapes()
    participants = [Participant(c.partition_id, c.rank, c.data.num_train) for c in clients]
    shared = method.initial_shared(layers, [c.rank for c in clients])
    first = [
        c.train(method.download(shared, p), None, 1)
        for c, p in zip(clients, participants, strict=True)
    ]
    participants = [
        Participant(p.partition_id, int(r.metrics["rank"]), p.num_examples)
        for p, r in zip(participants, first, strict=True)
    ]
    shared = method.aggregate(shared, [r.upload for r in first], participants)
    return [method.download(shared, p) for p in participants], [r.private for r in first]


def _assert_same(alone: TrainResult, together: TrainResult, private_rtol: float = RTOL) -> None:
    assert alone.upload.keys() == together.upload.keys()
    for key, value in alone.upload.items():
        np.testing.assert_allclose(together.upload[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    assert alone.private.keys() == together.private.keys()
    for key, value in alone.private.items():
        torch.testing.assert_close(
            together.private[key], value, rtol=private_rtol, atol=ATOL, msg=key
        )
    for scores_alone, scores_together in (
        (alone.metrics, together.metrics),
        (alone.local_model, together.local_model),
    ):
        assert scores_alone.keys() == scores_together.keys()
        for key, value in scores_alone.items():
            if key != "seconds":
                assert scores_together[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


@pytest.mark.parametrize(("strategy", "ranks", "extra"), CASES, ids=[c[0] for c in CASES])
def test_a_cohort_round_equals_each_client_alone(no_dropout, strategy, ranks, extra, tmp_path):
    clients = _clients(strategy, ranks, extra)
    assert all(c.base is clients[0].base for c in clients)
    shared, private = _round_two_inputs(clients)
    alone = [
        c.train(s, p, 2, shared_round=1, export_to=tmp_path / f"alone-{c.partition_id}")
        for c, s, p in zip(clients, shared, private, strict=True)
    ]
    together = train_cohort(
        clients,
        shared,
        private,
        2,
        shared_round=1,
        export_to=[tmp_path / f"cohort-{c.partition_id}" for c in clients],
        cohort_size=2,  # a cohort of 2, then one of 1
    )
    for a, t in zip(alone, together, strict=True):
        _assert_same(a, t)
    for c in clients:  # the exported adapters apply the same update (FLoRA's factors
        # come from an SVD, whose near-zero singular directions are arbitrary)
        assert _exported_updates(tmp_path / f"alone-{c.partition_id}").keys() == (
            _exported_updates(tmp_path / f"cohort-{c.partition_id}").keys()
        )
        for key, value in _exported_updates(tmp_path / f"alone-{c.partition_id}").items():
            together_update = _exported_updates(tmp_path / f"cohort-{c.partition_id}")[key]
            torch.testing.assert_close(together_update, value, rtol=RTOL, atol=ATOL, msg=key)


def _exported_updates(path: Path) -> dict[str, torch.Tensor]:
    """Per layer of an exported adapter, lora_B @ lora_A (and every other tensor as is)."""
    tensors = load_file(path / "adapter_model.safetensors")
    updates = {k: v for k, v in tensors.items() if ".lora_A." not in k and ".lora_B." not in k}
    for key in (k for k in tensors if ".lora_A." in k):
        updates[key.replace(".lora_A.", ".update.")] = (
            tensors[key.replace(".lora_A.", ".lora_B.")].double() @ tensors[key].double()
        )
    return updates


@pytest.mark.parametrize(
    ("extra", "reason"),
    [({"dora": True}, "DoRA"), ({"lora-init": "pissa"}, "residual base")],
)
def test_a_variant_that_cannot_be_batched_says_why_and_trains_alone(no_dropout, extra, reason):
    clients = _clients("fedit", "4", extra)
    shared, private = _round_two_inputs(clients)
    start = clients[0].start_training(shared[0], private[0], 2, 1)
    assert reason in (start.adapter.cohort_problem() or "")
    alone = [c.train(s, p, 2, 1) for c, s, p in zip(clients, shared, private, strict=True)]
    together = train_cohort(clients, shared, private, 2, 1)
    for a, t in zip(alone, together, strict=True):
        _assert_same(a, t)


def test_with_dropout_a_cohort_is_deterministic():
    clients = _clients("fedalora-hetero", "8,4,2", {"lora-dropout": 0.1})
    method, layers = clients[0].method, clients[0].base.layer_shapes()
    shared = method.initial_shared(layers, [c.rank for c in clients])
    first = train_cohort(clients, [shared] * 3, [None] * 3, 1)
    again = train_cohort(clients, [shared] * 3, [None] * 3, 1)
    for a, b in zip(first, again, strict=True):
        for key, value in a.upload.items():
            np.testing.assert_array_equal(b.upload[key], value)


def test_batches_are_padded_to_the_longest():
    short = {
        "input_ids": torch.tensor([[5, 6]]),
        "attention_mask": torch.tensor([[1, 1]]),
        "labels": torch.tensor([[IGNORE, 6]]),
    }
    long = {
        "input_ids": torch.tensor([[7, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1]]),
        "labels": torch.tensor([[IGNORE, 8, 9]]),
    }
    joined = concatenate([short, long], pad_id=0)
    assert joined["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert joined["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert joined["labels"].tolist() == [[IGNORE, 6, IGNORE], [IGNORE, 8, 9]]


def _two_instruction_clients_in_one_batch() -> tuple[
    list[FederatedClient], CohortModel, list[dict], dict[str, torch.Tensor]
]:
    """Two instruction clients (a causal LM) bound to a cohort, and three training
    examples of each: their batches, and the cohort's batch of both."""
    config = tiny_config(
        strategy="fedit",
        ranks="4",
        model="smollm2",
        dataset="instructions",
        partitioning="task",
        max_length=48,
    )
    clients = [FederatedClient(config, p, 8, 4) for p in range(2)]
    method, layers = clients[0].method, clients[0].base.layer_shapes()
    shared = method.initial_shared(layers, [4, 4])
    adapters = [c.build_adapter(shared, None) for c in clients]
    cohort = cohort_model(clients[0].base)
    batches = [collate(c.data.train, [0, 1, 2], cohort.tokenizer, c.device) for c in clients]
    cohort.bind(adapters, [3, 3])
    return clients, cohort, batches, concatenate(batches, cohort.tokenizer.pad_token_id)


def test_a_causal_lm_cohort_computes_logits_only_where_a_next_token_is_labelled():
    """The output layer runs on the positions whose next token is an answer token (not
    on prompts or padding), and each client gets its own predictions and targets."""
    clients, cohort, batches, batch = _two_instruction_clients_in_one_batch()
    vocabulary = clients[0].base.model.config.vocab_size
    shapes = []
    output = clients[0].base.model.get_output_embeddings()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, _: (
            shapes.append(tuple(inputs[0].shape)) if type(module) is type(output) else None
        )
    )
    try:
        logits, targets = cohort.scored_logits(batch, torch.device("cpu"), bf16=False)
    finally:
        hook.remove()
    for own, own_logits, own_targets in zip(batches, logits, targets, strict=True):
        expected = [t for row in own["labels"][:, 1:].tolist() for t in row if t != IGNORE]
        assert own_targets.tolist() == expected
        assert own_logits.shape == (len(expected), vocabulary)
    assert shapes[-1][0] == sum(len(t) for t in targets) < batch["input_ids"].numel()


def test_a_causal_lm_cohort_step_holds_one_clients_logits_at_a_time():
    """In training, the output layer runs on one client's scored positions at a time,
    and once more per client in the backward pass (recomputed, not kept), and each
    client's loss is its own mean cross-entropy."""
    _, cohort, _, batch = _two_instruction_clients_in_one_batch()
    cpu = torch.device("cpu")
    with torch.no_grad():
        logits, targets = cohort.scored_logits(batch, cpu, bf16=False)
    rows: list[int] = []
    assert cohort.output is not None
    hook = cohort.output.register_forward_hook(
        lambda _, inputs, __: rows.append(inputs[0].shape[0])
    )
    try:
        losses, hits = cohort.training_losses(batch, cpu, bf16=False)
        forward = list(rows)
        sum(losses).backward()
    finally:
        hook.remove()
    per_client = [len(t) for t in targets]
    assert forward == per_client  # one client's positions at a time
    assert sorted(rows[len(forward) :]) == sorted(per_client)  # each recomputed once
    for loss, (correct, count), own_logits, own_targets in zip(
        losses, hits, logits, targets, strict=True
    ):
        expected = torch.nn.functional.cross_entropy(own_logits, own_targets)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert (correct, count) == (int((own_logits.argmax(-1) == own_targets).sum()), count)
        assert count == len(own_targets)


@pytest.mark.parametrize(("strategy", "ranks"), [("fedalora-hetero", "8,4,2"), ("fedit", "4")])
def test_causal_lm_clients_of_different_lengths_batch_exactly(strategy, ranks):
    """Instruction clients (a causal LM, next-token loss on the answers) whose batches
    have different lengths: the cohort pads them to the longest, masked."""
    config = tiny_config(
        strategy=strategy,
        ranks=ranks,
        model="smollm2",
        dataset="instructions",
        partitioning="task",
        max_length=48,
        batch_size=4,
        local_steps=2,
        lora_dropout=0.0,
        local_model_scoring="final-round",
    )
    clients = [FederatedClient(config, p, 8, config.run.rank_for(p)) for p in range(3)]
    shared, private = _round_two_inputs(clients)
    alone = [c.train(s, p, 2, 1) for c, s, p in zip(clients, shared, private, strict=True)]
    together = train_cohort(clients, shared, private, 2, 1)
    for a, t in zip(alone, together, strict=True):
        # the private A, far from the loss through a causal LM's attention over rows
        # padded to other widths, rounds apart by up to about 1e-5 of its entries
        _assert_same(a, t, private_rtol=1e-4)


def test_an_adapter_without_output_delta_says_why():
    from fedalora.adapters import ClientAdapter, LoRAAdapter

    class OwnLayers(LoRAAdapter):  # a method's own adapter that never defined its delta
        output_delta = ClientAdapter.output_delta

    client = FederatedClient(tiny_config(strategy="fedit", ranks="4"), 0, 3, 4)
    base = client.base
    own = OwnLayers(base, 4, 2.0, 0.0, {"lora_alpha": 8})
    assert own.cohort_problem() == "OwnLayers does not define output_delta"
    with pytest.raises(NotImplementedError, match="output_delta"):
        own.output_delta(base.targets[0], torch.zeros(1, 384))


@pytest.mark.parametrize(
    ("strategy", "ranks", "extra"),
    [
        ("fedalora-hetero", "8,4,2", {"dataset": "reuters-r8", "global-test-examples": 20}),
        (
            "fedit",
            "4",
            {
                "model": "smollm2",
                "dataset": "instructions",
                "partitioning": "task",
                "max-length": 48,
                "max-new-tokens": 8,
                "test-fraction": 0.05,
            },
        ),
    ],
    ids=["classifier", "instructions"],
)
def test_a_cohort_is_scored_as_each_client_alone(strategy, ranks, extra):
    """Both protocols' scores in one batched pass (a classifier's accuracy and loss, on
    its own split and the official one; a causal LM's, and its greedy answers' ROUGE-1
    and exact match) equal each client's scored alone (scoring draws no dropout)."""
    config = tiny_config(strategy=strategy, ranks=ranks, lora_dropout=0.0, **extra)
    num_partitions = 8 if config.data.dataset == "instructions" else 3
    clients = [FederatedClient(config, p, num_partitions, config.run.rank_for(p)) for p in range(3)]
    shared, private = _round_two_inputs(clients)
    adapters = [
        c.build_adapter(s, p, 1, 2) for c, s, p in zip(clients, shared, private, strict=True)
    ]
    alone = [c.evaluate_adapter(a, final=True) for c, a in zip(clients, adapters, strict=True)]
    together = score_cohort(clients, adapters, final=True)
    for own, batched in zip(alone, together, strict=True):
        assert set(batched) == {*own, "seconds", "num_examples"}
        for key, value in own.items():
            assert batched[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


@pytest.mark.parametrize(
    ("eval_batch_size", "batch_size", "clients", "prompts"),
    [
        (32, 8, 8, 8),  # a training step's rows: 8 x 8
        (32, 8, 2, 16),  # one evaluation batch shared: 2 x 16
        (32, 64, 8, 32),  # never more than a client generates at once alone
        (32, 8, 1, 32),
    ],
)
def test_a_generation_pass_holds_a_training_step_or_an_evaluation_batch(
    eval_batch_size, batch_size, clients, prompts
):
    assert prompts_per_client(eval_batch_size, batch_size, clients) == prompts


def test_activation_checkpointing_recomputes_each_layer_and_changes_no_result(monkeypatch):
    """With activation-checkpointing a training step runs every decoder layer's MLP twice
    (forward, and again in the backward pass) in the adapters' and the cohort's copies
    of the base, and a round's results are those without it, alone and in a cohort."""
    settings = {
        "model": "smollm2",
        "dataset": "instructions",
        "partitioning": "task",
        "max_length": 48,
        "batch_size": 4,
        "local_steps": 2,
        "lora_dropout": 0.0,
        "local_model_scoring": "final-round",
    }
    plain = tiny_config(strategy="fedalora-hetero", ranks="8,4,2", **settings)
    config = tiny_config(
        strategy="fedalora-hetero", ranks="8,4,2", activation_checkpointing=True, **settings
    )
    reference = [FederatedClient(plain, p, 8, plain.run.rank_for(p)) for p in range(3)]
    clients = [FederatedClient(config, p, 8, config.run.rank_for(p)) for p in range(3)]
    assert clients[0].base is not reference[0].base
    shared, private = _round_two_inputs(reference)
    calls = []
    mlp = type(clients[0].base.model.model.layers[0].mlp)
    forward = mlp.forward

    def counted(module: torch.nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(module)  # a recompute calls forward, not the module (no hooks)
        return forward(module, *args, **kwargs)

    monkeypatch.setattr(mlp, "forward", counted)
    alone = clients[0].train(shared[0], private[0], 2, 1)
    forwards_alone = len(calls)
    together = train_cohort(clients, shared, private, 2, 1)
    forwards_together = len(calls) - forwards_alone
    monkeypatch.undo()
    depth = clients[0].base.model.config.num_hidden_layers
    assert forwards_alone == 2 * 2 * depth  # 2 steps, each layer run twice
    assert forwards_together == 2 * 2 * depth  # the cohort's one pass per step
    expected = [c.train(s, p, 2, 1) for c, s, p in zip(reference, shared, private, strict=True)]
    _assert_same(expected[0], alone)
    for e, t in zip(expected, together, strict=True):
        _assert_same(e, t, private_rtol=1e-4)  # as for causal LM cohorts above
