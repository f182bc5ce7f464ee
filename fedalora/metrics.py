"""Scores of generated text against a reference: ROUGE-1 F1 and exact match.

ROUGE-1 follows rouge-score's default ``rouge1`` (lower-cased alphanumeric tokens, no
stemming): F1 of the clipped unigram overlap.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def rouge1(prediction: str, reference: str) -> float:
    """Unigram F1 between the two texts (0 when either has no tokens)."""
    predicted, wanted = Counter(tokens(prediction)), Counter(tokens(reference))
    overlap = sum((predicted & wanted).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(predicted.values())
    recall = overlap / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts have the same tokens in the same order, else 0.0."""
    return float(tokens(prediction) == tokens(reference))


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 F1 and exact match over aligned predictions and references."""
    if len(predictions) != len(references) or not references:
        raise ValueError("need as many predictions as references, at least one")
    count = len(references)
    return {
        "rouge1": sum(map(rouge1, predictions, references)) / count,
        "exact_match": sum(map(exact_match, predictions, references)) / count,
    }
