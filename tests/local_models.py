"""Tiny, randomly initialised models of other families, saved as a user's local model
folder (config, weights, tokenizer) would be: they check that every part of fedalora
works on these architectures, not what the models learn."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    GPT2Config,
    PretrainedConfig,
    Qwen2Config,
    T5Config,
)

from fedalora.models import load_base_model


def _configs(vocab_size: int) -> dict[str, PretrainedConfig]:
    return {
        # GPT-2: its projections are transformers' Conv1D (weights stored d_in x d_out)
        "gpt2": GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2),
        # DistilBERT: no PEFT default target modules (q_lin, k_lin, v_lin, out_lin)
        "distilbert": DistilBertConfig(
            vocab_size=vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2
        ),
        # Qwen2: a causal LM family other than Llama
        "qwen2": Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
        ),
        # T5: an encoder-decoder, which fedalora refuses
        "t5": T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2
        ),
    }


def save_tiny_model(family: str, folder: Path, num_labels: int = 0, vocab_size: int = 0) -> Path:
    """A tiny ``family`` model in ``folder``: a sequence classifier with ``num_labels``
    labels, or a causal LM with 0, with an embedding of the tokenizer's size (or of
    ``vocab_size`` rows). DistilBERT takes the packaged MiniLM's WordPiece tokenizer,
    the others SmolLM2's byte-level BPE tokenizer."""
    donor = ("minilm", 2) if family == "distilbert" else ("smollm2", 0)
    tokenizer = load_base_model(donor[0], donor[1], num_hidden_layers=1).tokenizer
    config = _configs(vocab_size or len(tokenizer))[family]
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    if num_labels:
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
