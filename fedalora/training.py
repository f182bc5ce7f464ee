"""Local training and evaluation loops (plain PyTorch, any device)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, get_scheduler

from .data import IGNORE, collate
from .errors import require
from .settings import Section, setting


def batch_indices(
    num_examples: int, batch_size: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Endless batches of example indices, drawn without replacement and reshuffled
    every epoch."""
    order: list[int] = []
    while True:
        if len(order) < min(batch_size, num_examples):
            order = torch.randperm(num_examples, generator=generator).tolist()
        indices, order = order[:batch_size], order[batch_size:]
        yield indices


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16``; a no-op otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


#: run-config ``lr-schedule``: the learning rate over a round's steps (transformers'
#: schedulers, no warm-up): ``linear`` decays to 0 by the round's last step.
LR_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class LocalRecipe(Section):
    """A client's local training: ``local_steps`` AdamW steps per round on batches of
    ``batch_size`` at ``lr`` with ``weight_decay``, the learning rate following
    ``schedule`` over the round's steps (restarted every round), gradients clipped to a
    total L2 norm of ``max_grad_norm`` (0: no clipping). The defaults are the Fed-ALoRA
    reference's (the Hugging Face Trainer's): weight decay 0, linear decay to 0, no
    warm-up, clipping at 1.0."""

    title = "Local recipe"

    lr: float = setting("lr", 1e-3, "AdamW learning rate")
    weight_decay: float = setting(
        "weight-decay", 0.0, "AdamW's decoupled weight decay (the reference's 0)"
    )
    max_grad_norm: float = setting(
        "max-grad-norm",
        1.0,
        "gradients are clipped to this total L2 norm (the reference's 1.0); 0 = no clipping",
    )
    schedule: str = setting(
        "lr-schedule",
        "linear",
        "the learning rate over each round's steps: `linear` (decays to 0 by the round's "
        "last step, no warm-up; the reference's) or `constant`",
    )
    local_steps: int = setting("local-steps", 10, "optimiser steps per client per round")
    batch_size: int = setting("batch-size", 16, "examples per step")
    eval_batch_size: int = setting(
        "eval-batch-size",
        32,
        "examples per forward pass when scoring (and answers generated at once on "
        "instruction data)",
    )

    def validate(self) -> None:
        require(self.local_steps > 0, "local-steps", "must be >= 1")
        require(self.batch_size > 0, "batch-size", "must be >= 1")
        require(self.eval_batch_size > 0, "eval-batch-size", "must be >= 1")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(
            self.schedule in LR_SCHEDULES,
            "lr-schedule",
            f"choose one of: {', '.join(LR_SCHEDULES)} (linear: decay to 0 over each "
            "round's steps, as the Fed-ALoRA reference)",
        )
        require(self.weight_decay >= 0, "weight-decay", "must be >= 0 (AdamW's decoupled decay)")
        require(
            self.max_grad_norm >= 0,
            "max-grad-norm",
            "must be >= 0 (the largest total gradient norm; 0 turns clipping off)",
        )

    def optimiser(
        self, parameters: list[nn.Parameter], steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW over ``parameters`` and its schedule over ``steps`` steps."""
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        return optimizer, self.scheduler(optimizer, steps)

    def scheduler(
        self, optimizer: torch.optim.Optimizer, steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule of ``optimizer`` over ``steps`` steps."""
        return get_scheduler(self.schedule, optimizer, num_warmup_steps=0, num_training_steps=steps)

    def step(
        self,
        parameters: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> float:
        """Clip the gradients (if ``max_grad_norm``), take the optimiser step, advance
        the schedule; returns the gradients' total L2 norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        return float(norm)


def train_steps(
    model: nn.Module,
    parameters: list[nn.Parameter],
    examples: dict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    steps: int,
    batch_size: int,
    recipe: LocalRecipe,
    optimiser: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    device: torch.device,
    generator: torch.Generator,
    penalty: Callable[[], torch.Tensor] | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """``steps`` steps of ``optimiser`` (an optimiser and its schedule; gradients clipped
    as ``recipe`` says) on batches drawn without replacement (reshuffled per epoch),
    minimising the task loss plus ``penalty()`` when given; forward passes under bf16
    autocast when ``bf16`` (the trained parameters stay float32).

    Returns the mean task loss, the accuracy on the batches seen (for a causal LM,
    next-token accuracy on the response tokens) and the mean gradient norm before
    clipping.
    """
    optimizer, scheduler = optimiser
    model.train()
    batches = batch_indices(len(examples["labels"]), batch_size, generator)
    total_loss, total_norm, correct, seen = 0.0, 0.0, 0, 0
    for _ in range(steps):
        batch = collate(examples, next(batches), tokenizer, device)
        with autocast(device, bf16):
            output = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        (output.loss + penalty() if penalty else output.loss).backward()
        total_norm += recipe.step(parameters, optimizer, scheduler)
        total_loss += output.loss.item()
        hits, count = count_hits(output.logits, batch["labels"])
        correct, seen = correct + hits, seen + count
    return {
        "loss": total_loss / steps,
        "accuracy": correct / max(seen, 1),
        "grad_norm": total_norm / steps,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: dict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, float]:
    """Mean loss and accuracy over every example, in order (per token for a causal LM)."""
    model.eval()
    num_examples = len(examples["labels"])
    total_loss, correct, seen = 0.0, 0, 0
    for start in range(0, num_examples, batch_size):
        indices = list(range(start, min(start + batch_size, num_examples)))
        batch = collate(examples, indices, tokenizer, device)
        with autocast(device, bf16):
            output = model(**batch)
        hits, count = count_hits(output.logits, batch["labels"])
        total_loss += output.loss.item() * count
        correct, seen = correct + hits, seen + count
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    bf16: bool = False,
) -> list[str]:
    """Greedy responses to tokenised prompts (left-padded), up to the first newline."""
    model.eval()
    responses = []
    for start in range(0, len(prompts), batch_size):
        responses += greedy_answers(
            model, prompts[start : start + batch_size], tokenizer, max_new_tokens, device, bf16
        )
    return responses


def greedy_answers(
    model: nn.Module,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    device: torch.device,
    bf16: bool = False,
) -> list[str]:
    """One batch of greedy responses: the prompts left-padded to the longest, each answer
    up to its first newline."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with autocast(device, bf16):
        output = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    texts = (str(tokenizer.decode(row, skip_special_tokens=True)) for row in output[:, width:])
    return [text.strip().split("\n", 1)[0].strip() for text in texts]


def count_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct predictions, predictions counted): per example for a classifier, per
    response token (next-token, ignoring ``IGNORE`` labels) for a causal LM."""
    if labels.dim() == 1:
        return int((logits.argmax(-1) == labels).sum()), len(labels)
    targets = labels[:, 1:]
    counted = targets != IGNORE
    correct = (logits[:, :-1].argmax(-1) == targets) & counted
    return int(correct.sum()), int(counted.sum())
