"""Shared fixtures: a tiny real model (packaged MiniLM cut to 2 layers) on real data."""

from __future__ import annotations

import os

import pytest

from fedalora.config import FedConfig
from fedalora.methods import method_class

TINY = {
    "num-hidden-layers": 2,
    "local-steps": 3,
    "batch-size": 8,
    "max-length": 32,
    "dataset": "bbc-news",
    "lr": 0.001,
    "num-server-rounds": 2,
}
#: Method options of the suites' tiny runs, for the methods that take them: a small d_m,
#: and LoRI-D (dense B; LoRI-S has tests of its own).
TINY_OPTIONS = {"intermediate-rank": 4, "lori-sparsity": 0.0}


def tiny_config(**overrides: object) -> FedConfig:
    values = {**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    own = method_class(str(values.get("strategy", FedConfig.strategy))).Options.fields_by_key()
    values.update({k: v for k, v in TINY_OPTIONS.items() if k in own and k not in values})
    return FedConfig.from_run_config(values)


@pytest.fixture
def hetero_config() -> FedConfig:
    return tiny_config(strategy="fedalora-hetero", ranks="8,4,2")


@pytest.fixture
def homo_config() -> FedConfig:
    return tiny_config(strategy="fedalora", ranks="4")


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
