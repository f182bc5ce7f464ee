"""Local training and evaluation loops (plain PyTorch, any device)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import collate


def train_steps(model: nn.Module, parameters: list[nn.Parameter], examples: dict,
                tokenizer: PreTrainedTokenizerBase, *, steps: int, batch_size: int, lr: float,
                device: torch.device, generator: torch.Generator,
                penalty: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """``steps`` AdamW steps on batches drawn without replacement (reshuffled per epoch),
    minimising the task loss plus ``penalty()`` when given.

    Returns the mean task loss and the accuracy on the batches seen.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    model.train()
    num_examples = len(examples["labels"])
    order: list[int] = []
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(steps):
        if len(order) < min(batch_size, num_examples):
            order = torch.randperm(num_examples, generator=generator).tolist()
        indices, order = order[:batch_size], order[batch_size:]
        batch = collate(examples, indices, tokenizer, device)
        output = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        (output.loss + penalty() if penalty else output.loss).backward()
        optimizer.step()
        total_loss += output.loss.item()
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        seen += len(indices)
    return {"loss": total_loss / steps, "accuracy": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, examples: dict, tokenizer: PreTrainedTokenizerBase, *,
             batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean loss and accuracy over every example, in order."""
    model.eval()
    num_examples = len(examples["labels"])
    total_loss, correct = 0.0, 0
    for start in range(0, num_examples, batch_size):
        indices = list(range(start, min(start + batch_size, num_examples)))
        batch = collate(examples, indices, tokenizer, device)
        output = model(**batch)
        total_loss += output.loss.item() * len(indices)
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
    return {"loss": total_loss / num_examples, "accuracy": correct / num_examples}
