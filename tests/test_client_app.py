"""The ClientApp's handlers, called directly with real messages: what leaves the
client, what stays, and what a failure leaves behind."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from clients import client_app
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    PRIVATE_STATE_ROUND,
    keyed,
    to_numpy,
    to_record,
)

from .conftest import tiny_config


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are created inside a task, as Flower's runtime sets it up."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 100


def _context(config, partition_id=0, num_partitions=3, **node) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        state=RecordDict(),
        run_config=config.to_run_config(),
        node_config={"partition-id": partition_id, "num-partitions": num_partitions, **node},
    )


def _message(arrays, message_type=MessageType.TRAIN, **config) -> Message:
    """A message to client 0's node for client 0."""
    return Message(
        RecordDict(
            {
                keyed(ARRAYS, 0): to_record(arrays),
                CONFIG: ConfigRecord(
                    {"clients": [0], "server-round": 1, "shared-round": 0, **config}
                ),
            }
        ),
        dst_node_id=1,
        message_type=message_type,
    )


def _client(context):
    """The one client of a node hosting one."""
    (client,) = client_app._hosted(context).values()
    return client


def _b0(config, context) -> dict[str, np.ndarray]:
    """Fed-ALoRA's initial shared B0 (zeros, d_out x d_m) for this node's model."""
    client = _client(context)
    return config.method.initial_shared(client.base.layer_shapes(), [client.rank])


def _private_arrays(context) -> dict[str, np.ndarray]:
    """The newest private state in the node's memory."""
    private, _ = client_app.MemoryStateStore(context.state, 0).load(10**9)
    return {k: v.numpy() for k, v in private.items()}


def test_query_reports_rank_from_node_config_or_ranks(hetero_config):
    for context, rank in [
        (_context(hetero_config, 1), 4),
        (_context(hetero_config, 1, **{"lora-rank": 6}), 6),
    ]:
        reply = client_app.query(
            Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context
        )
        info = reply.content[CONFIG]
        assert (info["clients"], info["rank"]) == ([1], [rank]) and info["num-examples"][0] > 0


def test_private_a_and_m_never_leave_the_client(hetero_config):
    context = _context(hetero_config)
    shared = _b0(hetero_config, context)
    replies = []
    for server_round in (1, 2):
        replies.append(
            client_app.train(_message(shared, **{"server-round": server_round}), context)
        )
        replies.append(
            client_app.evaluate(
                _message(
                    shared, MessageType.EVALUATE, **{"run-name": "t", "server-round": server_round}
                ),
                context,
            )
        )
    private = {k: v for k, v in _private_arrays(context).items() if k.endswith((".A", ".M"))}
    assert private, "the client keeps A and M in its node state"
    for reply in replies:
        for record in reply.content.array_records.values():
            sent = to_numpy(record)
            assert all(k.endswith((".B2", ".B1")) for k in sent)
            for array in sent.values():
                for secret in private.values():
                    assert array.shape != secret.shape or not np.allclose(array, secret)


def test_private_state_persists_across_rounds_and_resets_when_asked():
    for persist in (True, False):
        config = tiny_config(strategy="fedalora-hetero", ranks="8,4,2", persist_private=persist)
        context = _context(config)
        shared = _b0(config, context)
        client_app.train(_message(shared), context)
        trained = {k: torch.from_numpy(v) for k, v in _private_arrays(context).items()}
        client = _client(context)
        keeps = client.method.keeps
        start_of_round_2 = client.build_adapter(shared, trained).private_state(keeps)
        initial = client.build_adapter(shared, None).private_state(keeps)  # A_0, M_0, B1_0
        for key in trained:
            expected = trained[key] if persist or key.startswith("head.") else initial[key]
            torch.testing.assert_close(start_of_round_2[key], expected, rtol=0, atol=0)
        a_key = next(k for k in trained if k.endswith(".A"))
        assert not torch.equal(trained[a_key], initial[a_key])  # round 1 did train A


def test_failed_round_leaves_private_state_untouched(hetero_config):
    context = _context(hetero_config)
    shared = _b0(hetero_config, context)
    client_app.train(_message(shared), context)
    before = _private_arrays(context)
    broken = {k: np.zeros((3, 3), np.float32) for k in shared}  # wrong shapes
    reply = client_app.train(_message(broken, **{"server-round": 2}), context)
    assert reply.has_error()  # answered with its exception, as under Ray or deployed
    assert reply.error.reason.startswith("ValueError: ") and "does not fit" in reply.error.reason
    after = _private_arrays(context)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_same_seed_same_upload(hetero_config):
    uploads = []
    for _ in range(2):
        context = _context(hetero_config)
        reply = client_app.train(_message(_b0(hetero_config, context)), context)
        uploads.append(to_numpy(reply.content[keyed(ARRAYS, 0)]))
    assert all(np.array_equal(uploads[0][k], uploads[1][k]) for k in uploads[0])


@pytest.mark.parametrize(
    "strategy, ranks, model",
    [
        ("fedalora-hetero", "8,4,2", "minilm"),
        ("fedalora", "4", "minilm"),
        ("fedalora-hetero", "8,4,2", "smollm2"),  # Llama family, converted from the packaged GGUF
        ("fedsa-lora", "4", "minilm"),  # private B
        ("ffa-lora", "8,4,2", "minilm"),  # frozen seeded A
        ("zeropad", "8,4,2", "minilm"),  # padded download, truncated
        ("flora", "8,4,2", "minilm"),  # merged stack + fresh LoRA, exported at full rank
        ("masa", "8,4,2", "minilm"),  # the experts' mix and B as dense factors
        ("lori", "8,4,2", "minilm"),  # frozen seeded A, B
    ],
)
def test_exported_adapter_reproduces_client_outputs(tmp_path, strategy, ranks, model):
    from fedalora.adapters import load_peft_adapter
    from fedalora.client import FederatedClient
    from fedalora.data import collate
    from fedalora.methods import Participant

    config = tiny_config(strategy=strategy, ranks=ranks, model=model)
    client, method = FederatedClient(config, 0, 3, config.run.rank_for(0)), config.method
    participant = Participant(0, client.rank, client.data.num_train)
    shared = method.initial_shared(client.base.layer_shapes(), [client.rank])
    upload, private, _, _ = client.train(method.download(shared, participant), None, 1)
    shared = method.aggregate(shared, [upload], [participant])  # non-zero shared state
    shared = method.download(shared, participant)
    _, private = client.evaluate(shared, private, shared_round=1)
    client.export(shared, private, tmp_path / "adapter", shared_round=1)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    peft_model = load_peft_adapter(client.base.model, tmp_path / "adapter").eval()
    own_model = client.build_adapter(shared, private, shared_round=1).model.eval()
    batch = collate(client.data.test, list(range(4)), client.base.tokenizer, torch.device("cpu"))
    with torch.no_grad():
        ours, theirs = own_model(**batch).logits, peft_model(**batch).logits
        base = client.base.model(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base, ours, atol=1e-3)  # the adapter does something


def test_base_model_is_loaded_once_per_process_and_shared(hetero_config):
    first = _client(_context(hetero_config, 0))
    second = _client(_context(hetero_config, 1))
    assert first is not second and first.rank != second.rank
    assert first.base is second.base  # one frozen base model serves every client
    shared = _b0(hetero_config, _context(hetero_config, 0))
    before = {k: v.clone() for k, v in first.base.model.state_dict().items()}
    first.train(shared, None, server_round=1)
    after = first.base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # training never touches it


def test_device_selection():
    from fedalora.config import ConfigError
    from fedalora.models import select_device

    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"run-config 'device'.*'auto'"):
            select_device("cuda")


def test_adapters_share_the_frozen_base_weights_and_copy_only_the_head(hetero_config):
    client = _client(_context(hetero_config, 0))
    shared = _b0(hetero_config, _context(hetero_config, 0))
    base = {p.data_ptr() for p in client.base.model.parameters()}
    for adapter in (client.build_adapter(shared, None), client.build_adapter(shared, None)):
        frozen = [p for p in adapter.model.parameters() if not p.requires_grad]
        assert frozen and all(p.data_ptr() in base for p in frozen)  # no copy of W0
        assert all(p.data_ptr() not in base for p in adapter.trainable_parameters())
        assert any(name.startswith("head.") for name in adapter.private_state(()))


def _disk_config(tmp_path, **overrides):
    return tiny_config(
        strategy="fedalora-hetero",
        ranks="8,4,2",
        state_store="disk",
        state_dir=str(tmp_path / "state"),
        **overrides,
    )


def test_disk_state_store_matches_memory_and_survives_a_restarted_node(tmp_path):
    uploads, privates = {}, {}
    for store in ("memory", "disk"):
        config = (
            _disk_config(tmp_path)
            if store == "disk"
            else tiny_config(strategy="fedalora-hetero", ranks="8,4,2")
        )
        context = _context(config)
        shared = _b0(config, context)
        for server_round in (1, 2):
            if store == "disk":
                context = _context(config)  # a fresh node each round: a restarted SuperNode
            reply = client_app.train(
                _message(shared, **{"server-round": server_round, "run-name": "t"}), context
            )
        uploads[store] = to_numpy(reply.content[keyed(ARRAYS, 0)])
        privates[store] = (
            load_file(str(tmp_path / "state" / "client-0.round-2.safetensors"))
            if store == "disk"
            else _private_arrays(context)
        )
        if store == "disk":  # nothing private in node memory
            assert not any(k.startswith("private") for k in context.state)
    assert uploads["memory"].keys() == uploads["disk"].keys()
    assert all(np.array_equal(uploads["memory"][k], uploads["disk"][k]) for k in uploads["disk"])
    assert privates["memory"].keys() == set(privates["disk"])
    assert all(
        np.array_equal(privates["memory"][k], privates["disk"][k].numpy())
        for k in privates["memory"]
    )


def test_node_config_state_dir_wins_and_an_unusable_one_fails_at_query(tmp_path):
    config = _disk_config(tmp_path)
    context = _context(config, **{"state-dir": str(tmp_path / "node")})
    client_app.train(_message(_b0(config, context), **{"run-name": "t"}), context)
    assert (tmp_path / "node" / "client-0.round-1.safetensors").exists()
    assert not (tmp_path / "state").exists()
    (tmp_path / "a-file").write_text("")
    bad = _context(config, **{"state-dir": str(tmp_path / "a-file" / "sub")})
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    reply = client_app.query(query, bad).content.config_records[CONFIG]
    assert reply["error-key"] == "state-dir" and "writable directory" in str(reply["error"])


def test_a_retried_round_trains_from_the_state_before_its_first_attempt(hetero_config):
    context = _context(hetero_config)
    shared = _b0(hetero_config, context)
    client_app.train(_message(shared, **{"server-round": 1}), context)
    first = client_app.train(_message(shared, **{"server-round": 2, "shared-round": 1}), context)
    again = client_app.train(_message(shared, **{"server-round": 2, "shared-round": 1}), context)
    assert first.content[keyed(METRICS, 0)][PRIVATE_STATE_ROUND] == 1
    assert again.content[keyed(METRICS, 0)][PRIVATE_STATE_ROUND] == 1
    up1, up2 = to_numpy(first.content[keyed(ARRAYS, 0)]), to_numpy(again.content[keyed(ARRAYS, 0)])
    assert all(np.array_equal(up1[k], up2[k]) for k in up1)


def test_bf16_autocast_trains_float32_factors():
    uploads = {}
    for bf16 in (False, True):
        config = tiny_config(strategy="fedalora-hetero", ranks="8,4,2", bf16=bf16)
        context = _context(config)
        reply = client_app.train(_message(_b0(config, context)), context)
        uploads[bf16] = to_numpy(reply.content[keyed(ARRAYS, 0)])
    for value in uploads[True].values():
        assert value.dtype == np.float32 and np.all(np.isfinite(value))
    key = next(k for k in uploads[True] if k.endswith(".B2"))
    assert not np.array_equal(uploads[True][key], uploads[False][key])  # autocast was on
    np.testing.assert_allclose(uploads[True][key], uploads[False][key], atol=5e-3)


def test_a_node_config_dataset_gives_the_node_all_of_its_own_file(tmp_path, hetero_config):
    rows = "".join(f'"text {i} about {"sport" if i % 2 else "money"}",{i % 2}\n' for i in range(20))
    (tmp_path / "mine.csv").write_text("text,label\n" + rows)
    context = _context(hetero_config, 2, dataset=str(tmp_path / "mine.csv"))
    reply = client_app.query(
        Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context
    )
    assert reply.content[CONFIG]["num-examples"] == [16]  # 20 rows, test-fraction 0.2
    assert reply.content[CONFIG]["clients"] == [2]
