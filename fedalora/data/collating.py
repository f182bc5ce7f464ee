"""Batches: tokenised examples padded into tensors on a device."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

#: Label of the prompt tokens, which the causal-LM loss ignores.
IGNORE = -100


def collate(
    examples: dict, indices: list[int], tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> dict[str, torch.Tensor]:
    """Pad the chosen examples (on the right) and move them to ``device``; causal-LM
    label sequences are padded with ``IGNORE``."""
    labels = [examples["labels"][i] for i in indices]
    batch: dict[str, torch.Tensor]
    if isinstance(labels[0], int):
        batch = dict(
            tokenizer.pad(
                {"input_ids": [examples["input_ids"][i] for i in indices]}, return_tensors="pt"
            )
        )
        batch["labels"] = torch.tensor(labels)
    else:
        batch = pad_right([examples["input_ids"][i] for i in indices], tokenizer.pad_token_id)
        batch["labels"] = pad_right(labels, IGNORE)["input_ids"]
    return {k: v.to(device) for k, v in batch.items()}


def pad_right(sequences: list[list[int]], value: int) -> dict[str, torch.Tensor]:
    """``input_ids`` padded with ``value`` to the longest sequence, and its attention mask."""
    width = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [value] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
    }
