"""The one configuration schema of a run, validated in one place.

Every key is a Flower run-config key (``[tool.flwr.app.config]`` in pyproject.toml,
overridable with ``flwr run . --run-config "key=value"``). Values are bool, int,
float or str only, so lists are comma-separated strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .sharing import SHARING, SharingSpec

SCALINGS = ("constant", "alpha-over-rank", "rslora")
DEVICES = ("auto", "cpu", "cuda")
STATE_STORES = ("memory", "disk")
_PARTITIONING = re.compile(r"^(iid|task|dirichlet:(?P<alpha>[0-9.eE+-]+))$")


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what is allowed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"run-config '{key}': {problem}")
        self.key = key


@dataclass(frozen=True)
class FedConfig:
    """Resolved, validated run configuration (field ``x_y`` is run-config key ``x-y``)."""

    strategy: str = "fedalora-hetero"
    ranks: str = "64,64,32,32,16,16,8,8"
    intermediate_rank: int = 16
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    lora_alpha: float = 2.0
    scaling: str = "constant"
    lora_dropout: float = 0.05
    rank_decay: float = 1.0
    rank_penalty: float = 0.0
    target_modules: str = "auto"
    model: str = "minilm"
    num_hidden_layers: int = 0
    dataset: str = "bbc-news"
    partitioning: str = "dirichlet:0.5"
    test_fraction: float = 0.2
    max_length: int = 64
    global_test_examples: int = 0
    max_new_tokens: int = 16
    seed: int = 42
    persist_private: bool = True
    state_store: str = "memory"
    state_dir: str = ""
    export_adapters: bool = True
    device: str = "auto"
    bf16: bool = False
    output_dir: str = "outputs"
    run_name: str = ""
    round_timeout: float = 3600.0
    round_retries: int = 1
    max_update_rms: float = 100.0
    max_norm_ratio: float = 10.0
    checkpoint: bool = True
    resume: bool = False

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Build from a Flower run-config; unknown keys and bad values raise ConfigError."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in fields:
                raise ConfigError(key, f"unknown key; known keys: {', '.join(sorted(fields))}")
            values[fields[key].name] = _coerce(key, raw, type(getattr(cls, fields[key].name)))
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The run-config mapping that reproduces this configuration."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every value that can be checked without a model or data."""
        if self.strategy not in SHARING:
            raise ConfigError("strategy", f"unknown strategy '{self.strategy}'; "
                              f"choose one of: {', '.join(SHARING)}")
        ranks = self.rank_list  # parses and checks the ranks string
        if not self.sharing.heterogeneous and len(set(ranks)) > 1:
            able = ", ".join(self.heterogeneous_strategies())
            raise ConfigError("ranks", f"strategy '{self.strategy}' needs one rank for every "
                              f"client, got '{self.ranks}'; use a single rank or a strategy "
                              f"that reconciles ranks: {able}")
        _require(self.intermediate_rank > 0, "intermediate-rank", "must be a positive integer "
                 f"(the shared dimension d_m, e.g. 16), got {self.intermediate_rank}")
        _require(self.num_server_rounds > 0, "num-server-rounds", "must be >= 1")
        _require(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        _require(0.0 < self.fraction_evaluate <= 1.0, "fraction-evaluate",
                 "must be in (0, 1]; the last round always evaluates every node")
        _require(self.min_nodes >= 1, "min-nodes", "must be >= 1")
        _require(self.local_steps > 0, "local-steps", "must be >= 1")
        _require(self.batch_size > 0, "batch-size", "must be >= 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        _require(self.lora_alpha > 0, "lora-alpha", "must be positive")
        _require(self.scaling in SCALINGS, "scaling", f"choose one of: {', '.join(SCALINGS)}")
        _require(0.0 <= self.lora_dropout < 1.0, "lora-dropout", "must be in [0, 1)")
        _require(0.0 < self.rank_decay <= 1.0, "rank-decay",
                 "must be in (0, 1]: HetLoRA's pruning factor gamma; 1 turns pruning off")
        _require(self.rank_penalty >= 0.0, "rank-penalty", "must be >= 0 (0 turns it off)")
        if self.rank_decay < 1.0 or self.rank_penalty > 0.0:
            _require(self.strategy == "hetlora", "rank-decay",
                     "rank self-pruning (rank-decay < 1, rank-penalty > 0) is HetLoRA's; "
                     "use strategy='hetlora' or leave rank-decay=1 and rank-penalty=0")
        _require(bool(self.target_modules.strip()), "target-modules",
                 "give 'auto' or comma-separated module names such as 'query,value'")
        _require(bool(self.model.strip()), "model",
                 "give a packaged model ('minilm', 'smollm2'), a Hugging Face id or a local path")
        _require(self.num_hidden_layers >= 0, "num-hidden-layers",
                 "must be >= 0 (0 keeps the model's own depth)")
        _require(bool(self.dataset.strip()), "dataset",
                 "give a packaged data set, a local .json/.jsonl/.csv file or a Hugging Face id")
        _require(_PARTITIONING.match(self.partitioning) is not None, "partitioning",
                 f"got '{self.partitioning}'; allowed: 'iid', 'task', 'dirichlet:<alpha>'")
        if self.partitioning.startswith("dirichlet:"):
            _require(self.dirichlet_alpha > 0, "partitioning", "dirichlet alpha must be > 0")
        _require(0.0 < self.test_fraction < 1.0, "test-fraction", "must be in (0, 1)")
        _require(self.max_length >= 8, "max-length", "must be >= 8 tokens")
        _require(self.max_new_tokens >= 1, "max-new-tokens",
                 "must be >= 1 (tokens generated per answer on instruction data)")
        _require(self.global_test_examples >= 0, "global-test-examples",
                 "must be >= 0 (0: no scoring on the data set's official test split)")
        _require(self.device in DEVICES, "device", f"choose one of: {', '.join(DEVICES)}")
        _require(self.state_store in STATE_STORES, "state-store",
                 f"choose one of: {', '.join(STATE_STORES)} (disk: one safetensors file per "
                 "client under state-dir)")
        _require(self.round_timeout > 0, "round-timeout", "must be positive (seconds)")
        _require(self.round_retries >= 0, "round-retries",
                 "must be >= 0 (times a round with fewer than min-nodes good replies is rerun)")
        _require(self.max_update_rms > 0, "max-update-rms",
                 "must be positive (largest root-mean-square entry of an accepted update)")
        _require(self.max_norm_ratio == 0 or self.max_norm_ratio > 1, "max-norm-ratio",
                 "must be > 1 (an update this many times the round's median RMS is rejected) "
                 "or 0 to turn the check off")
        if self.resume:
            _require(self.checkpoint, "resume", "needs checkpoint=true")
            _require(self.state_store == "disk", "resume",
                     "needs state-store='disk', so that each client's private factors outlive "
                     "the interrupted run; rerun both runs with state-store='disk'")

    @staticmethod
    def heterogeneous_strategies() -> list[str]:
        return [name for name, spec in SHARING.items() if spec.heterogeneous]

    # ------------------------------------------------------------ derived
    @property
    def rank_list(self) -> list[int]:
        """``ranks`` as integers; raises ConfigError when malformed or non-positive."""
        parts = [p.strip() for p in self.ranks.split(",")]
        if not parts or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
            raise ConfigError("ranks", f"expected comma-separated integers such as "
                              f"'64,32,16,8', got '{self.ranks}'")
        ranks = [int(p) for p in parts]
        bad = [r for r in ranks if r <= 0]
        if bad:
            raise ConfigError("ranks", f"every rank must be >= 1, got {bad[0]} in '{self.ranks}'")
        return ranks

    def rank_for(self, partition_id: int) -> int:
        """The rank of a client that has no ``lora-rank`` node-config: ranks, cycled."""
        ranks = self.rank_list
        return ranks[partition_id % len(ranks)]

    @property
    def sharing(self) -> SharingSpec:
        """What the strategy moves and what each client keeps."""
        return SHARING[self.strategy]

    @property
    def dirichlet_alpha(self) -> float:
        return float(self.partitioning.split(":", 1)[1])

    def peft_scaling(self, rank: int) -> dict[str, Any]:
        """The LoraConfig fields that make PEFT apply ``scale(rank)``."""
        if self.scaling == "constant":
            return {"lora_alpha": self.lora_alpha * rank, "use_rslora": False}
        return {"lora_alpha": self.lora_alpha, "use_rslora": self.scaling == "rslora"}

    def scale(self, rank: int) -> float:
        """The LoRA scale s of a client of this rank (same rule on client and server)."""
        if self.scaling == "constant":
            return self.lora_alpha
        if self.scaling == "alpha-over-rank":
            return self.lora_alpha / rank
        return self.lora_alpha / math.sqrt(rank)


def validate_rank(key: str, rank: int, layer_shapes: Mapping[str, tuple[int, int]]) -> None:
    """A rank must be >= 1 and no larger than the smallest adapted layer dimension."""
    if rank < 1:
        raise ConfigError(key, f"rank must be >= 1, got {rank}")
    limit = min(min(shape) for shape in layer_shapes.values())
    if rank > limit:
        raise ConfigError(key, f"rank {rank} exceeds the smallest adapted layer dimension "
                          f"({limit}); use a rank <= {limit}")


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert a run-config value to the schema's type, or raise ConfigError."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {"true", "false"}:
            return raw.lower() == "true"
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip()):
            return int(raw)
        raise ConfigError(key, f"expected an integer, got {raw!r}")
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)  # e.g. ranks="8" parsed by TOML as the integer 8
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    return raw
