"""Cohorts: several clients' local steps in one batched pass over one frozen base.

A cohort model is a copy of the worker's base model (its frozen weights shared, not
copied) whose adapted layers compute the frozen product once for the rows of every
client in the batch and add each client's own adapter contribution
(``ClientAdapter.output_delta``, term by term in the order the layer alone adds
them) to that client's rows; its head modules run each
client's own head on its rows. One local step of a cohort concatenates one batch of
every client, runs one forward and one backward, and then steps each client's own
optimiser with its own gradient clipping and learning-rate schedule. No parameter is
shared between clients and the base is frozen, so the summed loss gives every client
exactly its own gradient: a client's update is the one it gets training alone, to float
rounding, as in the multi-adapter training of mLoRA (Ye et al., VLDB 2025,
arXiv:2312.02515) and the segmented adapter products of Punica (Chen et al., MLSys 2024,
arXiv:2310.18547), here with every client's own optimiser.

The evaluation of a cohort (``evaluate_cohort``) and its greedy generation
(``generate_cohort``) batch the clients' rows the same way, without gradients. A causal
LM's output layer runs only on the positions whose next token is scored
(``CohortLogits``), not on prompts and padding; in training, one client at a time and
again in the backward pass (``CohortModel.training_losses``).

Rows of different clients meet only in the frozen layers' matrix products: attention
and normalisation act per example, and padding to the cohort's longest sequence is
masked. With dropout on, the masks come from one random stream for the whole batch, so
they differ from a client training alone; the run stays deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .adapters import ClientAdapter
from .adapters.adapter import share_frozen_weights
from .data import IGNORE, collate
from .models import BaseModel
from .training import LocalRecipe, autocast, batch_indices, count_hits, greedy_answers


@dataclass
class _Rows:
    """The batch's row ranges, one per client, in cohort order, and a causal LM's scored
    token positions (set before a forward)."""

    bounds: list[tuple[int, int]] = field(default_factory=list)
    #: (rows, tokens): the positions whose logits the output layer computes (None: all).
    scored: torch.Tensor | None = None
    #: The output layer left to the caller: the model returns the scored positions'
    #: hidden states (set before a forward).
    deferred: bool = False

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[start:end] for start, end in self.bounds]


class CohortLayer(nn.Module):
    """A frozen layer computed once for every row, plus each client's adapter output on
    its own rows."""

    def __init__(self, frozen: nn.Module, rows: _Rows) -> None:
        super().__init__()
        self.frozen, self.rows = frozen, rows
        self.deltas: list[Callable[[torch.Tensor], list[torch.Tensor]]] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shared = self.rows.split(self.frozen(x, *args, **kwargs))
        outputs = []
        for terms, rows, out in zip(self.deltas, self.rows.split(x), shared, strict=True):
            for term in terms(rows):  # in the order the layer alone adds them
                out = out + term.to(out.dtype)
            outputs.append(out)
        return torch.cat(outputs)


class CohortHead(nn.Module):
    """Each client's own head module on its own rows."""

    def __init__(self, rows: _Rows) -> None:
        super().__init__()
        self.rows = rows
        self.heads: list[nn.Module] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = [
            head(rows, *args, **kwargs)
            for head, rows in zip(self.heads, self.rows.split(x), strict=True)
        ]
        return torch.cat(outputs)


class CohortLogits(nn.Module):
    """A causal LM's output layer on the scored positions only (``_Rows.scored``), as
    one (positions, vocabulary) tensor: a vocabulary-wide row of logits for every
    token, prompts and padding included, is otherwise the largest tensor of a cohort's
    step. With ``_Rows.deferred``, the scored positions' hidden states instead."""

    def __init__(self, output: nn.Module, rows: _Rows) -> None:
        super().__init__()
        self.output, self.rows = output, rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rows.scored is not None:
            hidden = hidden[self.rows.scored]
        return hidden if self.rows.deferred else self.output(hidden)


class CohortModel:
    """The worker's base model once more, its frozen weights shared, with cohort layers
    on the adapted modules and cohort heads on the head modules."""

    def __init__(self, base: BaseModel) -> None:
        self.tokenizer, self.rows = base.tokenizer, _Rows()
        self.model = share_frozen_weights(base.model, base.head_modules)
        self.model.requires_grad_(False)
        self.layers: dict[str, CohortLayer] = {}
        for name in base.targets:
            self.layers[name] = CohortLayer(self.model.get_submodule(name), self.rows)
            self.model.set_submodule(name, self.layers[name])
        self.heads: dict[str, CohortHead] = {}
        for name in base.head_modules:
            self.heads[name] = CohortHead(self.rows)
            self.model.set_submodule(name, self.heads[name])
        output = (
            self.model.get_output_embeddings() if isinstance(self.model, PreTrainedModel) else None
        )
        #: a causal LM's frozen output layer, run on the scored positions only
        self.output = output if output is not None and not base.head_modules else None
        if self.output is not None:
            name = next(n for n, m in self.model.named_modules() if m is self.output)
            self.model.set_submodule(name, CohortLogits(self.output, self.rows))

    def scored_logits(
        self,
        batch: dict[str, torch.Tensor],
        device: torch.device,
        bf16: bool,
        hidden_only: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each client's logits and targets, one row per prediction: a classifier's per
        example; a causal LM's per token whose next token is labelled (transformers'
        shifted labels), its output layer run on those positions only (with
        ``hidden_only``, not run: their hidden states instead)."""
        labels = batch["labels"]
        causal = labels.dim() == 2
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE) if causal else labels
        scored = self.rows.scored = targets != IGNORE if causal else None
        self.rows.deferred = hidden_only
        try:
            with autocast(device, bf16):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
        finally:
            self.rows.scored, self.rows.deferred = None, False
        if scored is None:
            return self.rows.split(logits), self.rows.split(targets)
        if logits.dim() == 3:  # no output layer of its own to narrow (get_output_embeddings)
            logits = logits[scored]
        per_row = scored.sum(1).tolist()  # one device sync, not one per client
        counts = [sum(per_row[start:end]) for start, end in self.rows.bounds]
        return list(logits.split(counts)), list(targets[scored].split(counts))

    def training_losses(
        self, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Each client's mean task loss on its rows (to back-propagate) and its
        ``count_hits``. A causal LM's output layer and loss run one client at a time under
        activation checkpointing: the backward pass recomputes one client's logits (a
        vocabulary-wide row per scored token) at a time, instead of the step holding every
        client's logits and their log-softmax."""
        if self.output is None:  # a classifier's logits: one row per example
            pairs = list(zip(*self.scored_logits(batch, device, bf16), strict=True))
            return (
                [F.cross_entropy(logits.float(), targets) for logits, targets in pairs],
                [count_hits(logits.detach(), targets) for logits, targets in pairs],
            )
        own_hidden, own_targets = self.scored_logits(batch, device, bf16, hidden_only=True)
        losses, hits = [], []
        for hidden, targets in zip(own_hidden, own_targets, strict=True):
            loss, correct = checkpoint(
                self._scored_loss, hidden, targets, device, bf16, use_reentrant=False
            )
            losses.append(loss)
            hits.append((int(correct), len(targets)))
        return losses, hits

    def _scored_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, device: torch.device, bf16: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean cross-entropy of the output layer's logits on ``hidden``, and how many
        of their predictions are ``targets``."""
        assert self.output is not None
        with autocast(device, bf16):
            logits = self.output(hidden)
        return F.cross_entropy(logits.float(), targets), (logits.argmax(-1) == targets).sum()

    def bind(self, adapters: Sequence[ClientAdapter], rows_per_client: Sequence[int]) -> None:
        """Route ``rows_per_client[k]`` consecutive rows of the next batches through
        ``adapters[k]``."""
        problems = [p for p in (a.cohort_problem() for a in adapters) if p]
        if problems:
            raise ValueError(f"these adapters cannot share a batched pass: {problems[0]}")
        ends = torch.tensor(rows_per_client).cumsum(0).tolist()
        self.rows.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        for name, layer in self.layers.items():
            layer.deltas = [_delta_of(a, name) for a in adapters]
        for name, head in self.heads.items():
            head.heads = [a.inner_model.get_submodule(name) for a in adapters]


def _delta_of(adapter: ClientAdapter, module: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    return lambda x: adapter.output_terms(module, x)


@dataclass
class CohortMember:
    """One client's part of a cohort's local training: its adapter (built for the
    round), its training examples, optimiser and schedule, batch-order generator and
    loss penalty."""

    adapter: ClientAdapter
    examples: dict
    optimiser: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
    generator: torch.Generator
    penalty: Callable[[], torch.Tensor] | None = None


def train_cohort_steps(
    cohort: CohortModel,
    members: Sequence[CohortMember],
    *,
    steps: int,
    batch_size: int,
    recipe: LocalRecipe,
    device: torch.device,
    bf16: bool = False,
) -> list[dict[str, float]]:
    """``steps`` local steps of every member at once: each step one batch of every
    member (drawn as ``fedalora.training.train_steps`` draws it alone) through one
    forward and one backward of ``cohort``; then each member's own gradient clipping
    (``recipe``), optimiser step and schedule step. Returns each member's metrics as
    ``train_steps`` does (mean task loss, accuracy on its batches, mean gradient norm
    before clipping)."""
    tokenizer = cohort.tokenizer
    draws = [batch_indices(len(m.examples["labels"]), batch_size, m.generator) for m in members]
    parameters = [m.adapter.trainable_parameters() for m in members]
    cohort.model.train()
    for member in members:
        member.adapter.model.train()
    totals = [{"loss": 0.0, "grad_norm": 0.0, "correct": 0, "seen": 0} for _ in members]
    for _ in range(steps):
        batches = [
            collate(m.examples, next(draw), tokenizer, device)
            for m, draw in zip(members, draws, strict=True)
        ]
        cohort.bind([m.adapter for m in members], [len(b["labels"]) for b in batches])
        batch = concatenate(batches, tokenizer.pad_token_id)
        losses, hits = cohort.training_losses(batch, device, bf16)
        objective = sum(
            loss + member.penalty() if member.penalty else loss
            for loss, member in zip(losses, members, strict=True)
        )
        for member in members:
            member.optimiser[0].zero_grad(set_to_none=True)
        assert isinstance(objective, torch.Tensor)
        objective.backward()
        for k, member in enumerate(members):
            total = totals[k]
            total["grad_norm"] += recipe.step(parameters[k], *member.optimiser)
            total["loss"] += losses[k].item()
            total["correct"] += hits[k][0]
            total["seen"] += hits[k][1]
    return [
        {
            "loss": t["loss"] / steps,
            "accuracy": t["correct"] / max(t["seen"], 1),
            "grad_norm": t["grad_norm"] / steps,
        }
        for t in totals
    ]


@torch.no_grad()
def evaluate_cohort(
    cohort: CohortModel,
    adapters: Sequence[ClientAdapter],
    examples: Sequence[dict],
    *,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
) -> list[dict[str, float]]:
    """``fedalora.training.evaluate`` of every adapter on its own examples at once: each
    forward of ``cohort`` takes the next rows of every client that has any left, about
    ``batch_size`` rows in all (``rows_per_client``), so that it holds what one client's
    evaluation batch holds."""
    cohort.model.eval()
    for adapter in adapters:
        adapter.model.eval()
    totals = [{"loss": 0.0, "correct": 0, "seen": 0} for _ in adapters]
    sizes = [len(e["labels"]) for e in examples]
    share = rows_per_client(batch_size, len(adapters))
    for start in range(0, max(sizes), share):
        members = [k for k, size in enumerate(sizes) if start < size]
        batches = [
            collate(
                examples[k],
                list(range(start, min(start + share, sizes[k]))),
                cohort.tokenizer,
                device,
            )
            for k in members
        ]
        cohort.bind([adapters[k] for k in members], [len(b["labels"]) for b in batches])
        batch = concatenate(batches, cohort.tokenizer.pad_token_id)
        for k, logits, targets in zip(
            members, *cohort.scored_logits(batch, device, bf16), strict=True
        ):
            hits, count = count_hits(logits, targets)
            totals[k]["loss"] += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            totals[k]["correct"] += hits
            totals[k]["seen"] += count
    return [
        {"loss": t["loss"] / max(t["seen"], 1), "accuracy": t["correct"] / max(t["seen"], 1)}
        for t in totals
    ]


@torch.no_grad()
def generate_cohort(
    cohort: CohortModel,
    adapters: Sequence[ClientAdapter],
    prompts: Sequence[list[list[int]]],
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    bf16: bool = False,
) -> list[list[str]]:
    """``fedalora.training.generate_responses`` of every adapter on its own prompts at
    once: each greedy generation of ``cohort`` takes the next ``batch_size`` prompts of
    every client that has any left, as each would generate them alone (each row through
    its own client's adapter at every step). A generated token's logits are one row's,
    so a pass holds mostly the key-value caches of its rows (``prompts_per_client``
    sizes them)."""
    cohort.model.eval()
    for adapter in adapters:
        adapter.model.eval()
    answers: list[list[str]] = [[] for _ in adapters]
    for start in range(0, max(len(p) for p in prompts), batch_size):
        members = [k for k, own in enumerate(prompts) if start < len(own)]
        chunks = [prompts[k][start : start + batch_size] for k in members]
        cohort.bind([adapters[k] for k in members], [len(c) for c in chunks])
        texts = greedy_answers(
            cohort.model,
            [prompt for chunk in chunks for prompt in chunk],
            cohort.tokenizer,
            max_new_tokens,
            device,
            bf16,
        )
        for k, (first, end) in zip(members, cohort.rows.bounds, strict=True):
            answers[k] += texts[first:end]
    return answers


def prompts_per_client(eval_batch_size: int, batch_size: int, clients: int) -> int:
    """Each client's prompts in one generation pass of ``clients``: its training batch
    (``batch_size``) or its share of one evaluation batch, whichever is more, and never
    more than it generates at once alone (``eval_batch_size``). A pass then holds about
    the rows of one training step of the cohort, which the node is sized for; with every
    client's whole evaluation batch at once, the key-value caches of 8 x 19 SmolLM2
    prompts were a node's peak."""
    return min(eval_batch_size, max(batch_size, rows_per_client(eval_batch_size, clients)))


def rows_per_client(batch_size: int, clients: int) -> int:
    """Each client's rows in one evaluation pass of ``clients``: ``batch_size`` shared
    among them (at least one each), so that the pass holds one evaluation batch's logits."""
    return max(1, batch_size // clients)


def concatenate(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """The clients' collated batches as one, right-padded to the longest sequence
    (``input_ids`` with ``pad_id``, the attention mask with 0, token labels with
    ``IGNORE``)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    joined = {}
    for key in ("input_ids", "attention_mask", "labels"):
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2:
            parts = [F.pad(p, (0, width - p.shape[1]), value=fills[key]) for p in parts]
        joined[key] = torch.cat(parts)
    return joined
