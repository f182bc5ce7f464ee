"""Model families beyond BERT and Llama: GPT-2's Conv1D projections under every method
(train, aggregate, export, reload), and a classifier checkpoint whose label count is
not the data's."""

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.pytorch_utils import Conv1D

from fedalora import models
from fedalora.adapters import export_peft_adapter, load_peft_adapter, method_state
from fedalora.errors import ConfigError
from fedalora.methods import Participant, registered_methods
from fedalora.models import (
    adapted_layer_shapes,
    linear_layer_names,
    load_base_model,
    model_source,
    resolve_targets,
)

from .conftest import tiny_config

BUILT_IN = list(registered_methods(built_in=True))
CLASSES = 5


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 (2 layers, hidden 64) with SmolLM2's tokenizer, saved."""
    tokenizer = load_base_model("smollm2", 0, num_hidden_layers=1).tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    )
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_bases(gpt2):
    """The GPT-2 as a frozen sequence classifier (a new score head) and causal LM."""
    return {"classifier": load_base_model(gpt2, CLASSES), "causal-lm": load_base_model(gpt2, 0)}


def test_gpt2_s_conv1d_projections_are_targets_with_their_own_dimensions(gpt2, gpt2_bases):
    base = gpt2_bases["classifier"]
    assert base.targets == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(isinstance(base.model.get_submodule(t), Conv1D) for t in base.targets)
    assert base.layer_shapes() == dict.fromkeys(base.targets, (192, 64))  # (d_out, d_in)
    assert adapted_layer_shapes(gpt2) == base.layer_shapes()  # the server's, from the config
    assert base.head_modules == ["score"]
    assert linear_layer_names(base.model) == ["c_attn", "c_fc", "c_proj", "score"]
    with pytest.raises(ConfigError, match=r"are named c_attn, c_fc, c_proj, score"):
        resolve_targets(base.model, "q_proj")
    assert resolve_targets(base.model, "c_fc,c_proj")[:2] == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
    ]


def _batch(base, labelled=True):
    """Four random 12-token sequences, with labels for the model's loss."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(len(base.tokenizer), (4, 12), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labelled:
        causal = hasattr(base.model, "lm_head")
        batch["labels"] = ids if causal else torch.arange(4) % CLASSES
    return batch


def _build_adapter(config, base, shared, private=None, shared_round=0):
    """Client 0's adapter for round ``shared_round`` + 1, as
    ``FederatedClient.build_adapter`` builds it."""
    method = config.method
    rank = method.client_rank(config.run.rank_for(0), method_state(private))
    torch.manual_seed(config.run.seed)
    adapter = method.make_adapter(base, rank, 0.0)
    adapter.server_round = shared_round + 1
    if private:
        adapter.load_private(private, method.keeps)
    method.install(adapter, method.download(shared, _me(config)), shared_round)
    method.start_round(adapter)
    return adapter


def _me(config):
    return Participant(0, config.run.rank_for(0), 10)


def _train(adapter, batch, steps=2):
    """A few steps of the adapter's own optimiser on ``batch``."""
    optimizer, _ = adapter.optimiser(tiny_config(lr=0.05).recipe, steps)
    adapter.model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        adapter.model(**batch).loss.backward()
        optimizer.step()


@pytest.mark.parametrize("family", ["classifier", "causal-lm"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_trains_on_gpt2_and_its_export_reproduces_the_client(
    tmp_path, gpt2, gpt2_bases, name, family
):
    assert_round_trip(tmp_path, gpt2_bases[family], name, gpt2)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"]  # PEFT's flag for Conv1D's d_in x d_out weight


def assert_round_trip(tmp_path, base, name, model):
    """Method ``name``'s client 0 trains on ``base`` (loaded from ``model``), the server
    aggregates, and the adapter exported from the next round's client gives its logits."""
    heterogeneous = registered_methods()[name].heterogeneous
    config = tiny_config(strategy=name, ranks="4,2" if heterogeneous else "4", model=model)
    method, me = config.method, _me(config)
    shared = method.initial_shared(base.layer_shapes(), config.run.rank_list)
    adapter = _build_adapter(config, base, shared)
    _train(adapter, _batch(base))
    upload = method.upload(adapter)
    shared = method.aggregate(shared, [upload], [me])  # a non-zero shared state
    ours = _build_adapter(config, base, shared, adapter.private_state(method.keeps), 1)
    export_peft_adapter(method.export_factors(ours), ours, base.model, tmp_path / "adapter")
    exported = load_peft_adapter(base.model, tmp_path / "adapter").eval()
    batch = _batch(base, labelled=False)
    with torch.no_grad():
        mine, theirs = ours.model.eval()(**batch).logits, exported(**batch).logits
        plain = base.model(**batch).logits
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, mine, atol=1e-3)  # the adapter does something


@pytest.fixture(scope="module")
def three_label_bert(tmp_path_factory):
    """A tiny BERT sequence classifier saved with a trained 3-label head."""
    source = model_source("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    path = tmp_path_factory.mktemp("bert3")
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_head_of_another_label_count_is_refused_with_its_fix(three_label_bert, tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_base_model(str(three_label_bert), CLASSES)
    assert refused.value.key == "model"
    assert "the checkpoint's classifier has 3 labels, the data set has 5; set reinit-head=true" in (
        str(refused.value)
    )
    # a head that fits is the checkpoint's, and still trained (it may be a fresh one)
    assert load_base_model(str(three_label_bert), 3).head_modules == ["classifier"]
    # a config that does not name the architecture: transformers' own check, reworded
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for item in three_label_bert.iterdir():
        (hidden / item.name).write_bytes(item.read_bytes())
    config = json.loads((hidden / "config.json").read_text())
    del config["architectures"]
    (hidden / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"classifier has another label count.*reinit-head"):
        load_base_model(str(hidden), CLASSES)


def test_reinit_head_trains_a_new_head_like_a_missing_one(three_label_bert, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        base = load_base_model(str(three_label_bert), CLASSES, reinit_head=True)
    assert base.head_modules == ["classifier"]
    assert base.model.get_submodule("classifier").out_features == CLASSES
    [warning] = [r for r in caplog.records if r.name == models.__name__]
    assert warning.levelno == logging.WARNING
    assert f"classifier has 3 labels, the data set has {CLASSES}" in warning.getMessage()
    config = tiny_config(strategy="fedalora", ranks="4", reinit_head=True)
    assert config.model.reinit_head
    shared = config.method.initial_shared(base.layer_shapes(), [4])
    adapter = _build_adapter(config, base, shared)
    head = adapter.private_state(config.method.keeps)["head.classifier.weight"]
    assert head.shape == (CLASSES, 32)
    assert adapter.inner_model.get_submodule("classifier").weight.requires_grad
    _train(adapter, _batch(base))
    export_peft_adapter(adapter.peft_factors(), adapter, base.model, tmp_path / "adapter")
    exported = load_peft_adapter(base.model, tmp_path / "adapter").eval()
    batch = _batch(base, labelled=False)
    with torch.no_grad():
        torch.testing.assert_close(
            exported(**batch).logits, adapter.model.eval()(**batch).logits, atol=1e-4, rtol=1e-4
        )


# ------------------------------------------------------------------ tokenizers
@pytest.fixture(scope="module")
def wordpiece_of_five_words(tmp_path_factory):
    """A BERT classifier whose WordPiece vocabulary has five words and its tokenizer."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("five-words")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra", "yak", "owl", "eel", "emu"]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=CLASSES,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_a_tokenizer_that_turns_the_clients_text_into_unknown_tokens_stops_it(
    wordpiece_of_five_words,
):
    """Its vocabulary fits the model's embedding, but not English news: every word is
    '[UNK]', which would train on noise."""
    from fedalora.client import FederatedClient

    config = tiny_config(
        model=str(wordpiece_of_five_words),
        num_hidden_layers=1,
        strategy="fedalora",
        ranks="4",
        target_modules="query,value",
    )
    with pytest.raises(ConfigError) as refused:
        FederatedClient(config, 0, 4, 4)
    assert refused.value.key == "model"
    assert refused.value.problem.startswith("the tokenizer turns 100% of client 0's tokens into")
    assert "'[UNK]'" in refused.value.problem


def test_a_tokenizer_key_names_the_tokenizer_and_must_fit_the_model(
    wordpiece_of_five_words, gpt2, tmp_path
):
    with pytest.raises(ConfigError) as refused:  # MiniLM's 30522 rows, a 10-token vocabulary
        load_base_model("minilm", CLASSES, tokenizer_name=str(wordpiece_of_five_words))
    assert refused.value.key == "tokenizer"
    assert "has 10 tokens and the model's embedding 30522 rows (far fewer" in refused.value.problem
    bare = tmp_path / "gpt2-without-tokenizer"  # the weights alone, the tokenizer elsewhere
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((Path(gpt2) / name).read_bytes())
    with pytest.raises(ConfigError, match=r"has no tokenizer .*point tokenizer= at"):
        load_base_model(str(bare), CLASSES)
    base = load_base_model(str(bare), CLASSES, tokenizer_name=gpt2)
    assert len(base.tokenizer) == base.model.config.vocab_size


def test_activation_checkpointing_on_a_model_without_it_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(BertForSequenceClassification, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="activation-checkpointing=false") as caught:
        load_base_model("minilm", CLASSES, num_hidden_layers=1, activation_checkpointing=True)
    assert caught.value.key == "activation-checkpointing"
