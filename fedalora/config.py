"""The one configuration schema of a run: one section per concern, each key declared once.

Every key is a Flower run-config key (``[tool.flwr.app.config]`` in pyproject.toml,
overridable with ``flwr run . --run-config "key=value"``). Values are bool, int,
float or str only, so lists are comma-separated strings. Each section is a frozen
dataclass whose fields carry key, default and help (``fedalora.settings``) and whose
``validate`` checks its own values; ``FedConfig.validate`` adds the checks that span
sections. The keys of the chosen method's own options (``Method.Options``) sit beside
the global ones; a key of another method's options is accepted only at its default
value. ``python -m fedalora.config`` prints the key reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .data import DataSettings
from .errors import ConfigError, require
from .methods import DEFAULT_METHOD, Method, MethodOptions, method_class, registered_methods
from .models import NO_QUANTIZATION, ModelSettings
from .privacy import DPSettings
from .robust import EXAMPLES, METHOD_RULE, UNIFORM, RobustSettings
from .run_config import unknown_key_problem
from .scaling import LoRAScaling
from .settings import Section, coerce, key_of, section, setting
from .tracking import TRACKERS
from .training import LocalRecipe
from .variants import Variants

#: run-config ``local-model-scoring``: every round, or only the last.
EVERY_ROUND, FINAL_ROUND_ONLY = "every-round", "final-round"
LOCAL_MODEL_SCORINGS = (EVERY_ROUND, FINAL_ROUND_ONLY)
STATE_STORES = ("memory", "disk")


@dataclass(frozen=True)
class RunSettings(Section):
    """The federation: clients' ranks, rounds, sampling, what is scored, the seed."""

    title = "Run and rounds"

    ranks: str = setting(
        "ranks",
        "64,64,32,32,16,16,8,8",
        "LoRA rank per client, indexed by partition id and cycled; a node's `lora-rank` "
        "node-config wins",
    )
    num_server_rounds: int = setting("num-server-rounds", 5, "federated rounds")
    num_clients: int = setting(
        "num-clients",
        0,
        "clients (data partitions) of the run, spread over its nodes: node k of n hosts "
        "clients k, k + n, k + 2n, ... (a cohort, trained in one batched pass per step); "
        "0 = one client per node. A deployed node's `partition-ids` node-config names its own",
    )
    cohort_size: int = setting(
        "cohort-size",
        8,
        "most clients of a node in one batched pass: a node builds one chunk of this many "
        "clients' adapters and optimisers at a time, and a pass holds the activations of "
        "all of its clients' batches, so this bounds a node's memory (see also "
        "activation-checkpointing); 0 = all of the node's sampled clients",
    )
    fraction_train: float = setting(
        "fraction-train", 1.0, "fraction of clients sampled per round (seeded)"
    )
    fraction_evaluate: float = setting(
        "fraction-evaluate",
        1.0,
        "fraction of clients evaluated after aggregation per round (seeded); the last round "
        "always evaluates every client (unless `final-evaluation=false`); 0 = only the last "
        "round (every trained client also scores its local model each round)",
    )
    local_model_scoring: str = setting(
        "local-model-scoring",
        EVERY_ROUND,
        "when a training client scores its local model right after training (the paper's "
        "protocol): `every-round`, or `final-round` (the last round only: a long LLM run "
        "spends most of its time scoring)",
    )
    final_evaluation: bool = setting(
        "final-evaluation",
        True,
        "whether the last round evaluates every client after aggregation (the "
        "post-aggregation protocol, and the export of `clients/<id>/adapter/`); `false` with "
        "`fraction-evaluate=0` scores the paper's protocol only",
    )
    min_nodes: int = setting(
        "min-nodes", 2, "nodes to wait for, and client updates needed to aggregate a round"
    )
    seed: int = setting(
        "seed",
        42,
        "seeds partitioning, initialisation, sampling and batches: same seed, same run",
    )

    def validate(self) -> None:
        self.rank_list  # noqa: B018 - parses and checks the ranks string
        require(self.num_server_rounds > 0, "num-server-rounds", "must be >= 1")
        require(
            self.num_clients >= 0,
            "num-clients",
            "must be >= 0 (the run's clients; 0 = one per node)",
        )
        require(
            self.cohort_size >= 0,
            "cohort-size",
            "must be >= 0 (most clients in one batched pass; 0 = all of a node's)",
        )
        require(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        require(
            0.0 <= self.fraction_evaluate <= 1.0,
            "fraction-evaluate",
            "must be in [0, 1]; the last round always evaluates every client (0: only it)",
        )
        require(
            self.local_model_scoring in LOCAL_MODEL_SCORINGS,
            "local-model-scoring",
            f"choose one of: {', '.join(LOCAL_MODEL_SCORINGS)} (when a training client scores "
            "its local model, the paper's protocol)",
        )
        require(self.min_nodes >= 1, "min-nodes", "must be >= 1")

    @property
    def rank_list(self) -> list[int]:
        """``ranks`` as integers; raises ConfigError when malformed or non-positive."""
        parts = [p.strip() for p in self.ranks.split(",")]
        if not parts or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
            raise ConfigError(
                "ranks",
                f"expected comma-separated integers such as '64,32,16,8', got '{self.ranks}'",
            )
        ranks = [int(p) for p in parts]
        bad = [r for r in ranks if r <= 0]
        if bad:
            raise ConfigError("ranks", f"every rank must be >= 1, got {bad[0]} in '{self.ranks}'")
        return ranks

    def rank_for(self, partition_id: int) -> int:
        """The rank of a client that has no ``lora-rank`` node-config: ranks, cycled."""
        ranks = self.rank_list
        return ranks[partition_id % len(ranks)]


@dataclass(frozen=True)
class LoRASettings(Section):
    """The clients' adapters: the scale, dropout, target layers and LoRA variants."""

    title = "LoRA and variants"

    scaling: LoRAScaling = section(LoRAScaling)
    dropout: float = setting("lora-dropout", 0.05, "dropout on the adapter input")
    target_modules: str = setting(
        "target-modules",
        "auto",
        "comma-separated layer names; `auto` = PEFT's default for the architecture (BERT: "
        "query,value; Llama: q_proj,v_proj; GPT-2: c_attn, a transformers `Conv1D`, so its "
        "exports set PEFT's `fan_in_fan_out`)",
    )
    variants: Variants = section(Variants)

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.dropout < 1.0, "lora-dropout", "must be in [0, 1)")
        require(
            bool(self.target_modules.strip()),
            "target-modules",
            "give 'auto' or comma-separated module names such as 'query,value'",
        )


@dataclass(frozen=True)
class FaultSettings(Section):
    """What survives a fault: reply deadlines and retries, reply screening, the clients'
    private state between rounds, checkpoints and resume."""

    title = "Faults, state and checkpoints"

    round_timeout: float = setting(
        "round-timeout",
        3600.0,
        "seconds to wait for replies in a round; a node that has not replied by then counts "
        "as failed",
    )
    round_retries: int = setting(
        "round-retries",
        1,
        "times a round is rerun (fresh node sample) when fewer than `min-nodes` updates were "
        "accepted; after that the round is skipped and the shared state kept",
    )
    max_update_rms: float = setting(
        "max-update-rms", 100.0, "an update whose root-mean-square entry is larger is rejected"
    )
    max_norm_ratio: float = setting(
        "max-norm-ratio",
        10.0,
        "an update whose RMS entry is over this many times the round's median (3+ updates) "
        "is rejected; 0 = off",
    )
    persist_private: bool = setting(
        "persist-private",
        True,
        "keep the private factors across rounds; `false` restarts them from the common A_0 "
        "each round as the reference code does (the head is kept)",
    )
    state_store: str = setting(
        "state-store",
        "memory",
        "where each client keeps its private state between rounds: `memory` (Flower's node "
        "`context.state`) or `disk` (safetensors files `client-<id>.round-<t>.safetensors`, "
        "written atomically; needed by `resume` and by a SuperNode that must survive a "
        "restart)",
    )
    state_dir: str = setting(
        "state-dir",
        "",
        "`state-store=disk` directory; a node's `state-dir` node-config wins; empty = "
        "`<output-dir>/<run-name>/private-state/` (in a deployment, on the node's own disk)",
    )
    checkpoint: bool = setting("checkpoint", True, "write `checkpoint/` after every round")
    resume: bool = setting(
        "resume",
        False,
        "continue `run-name` from its last checkpoint (needs `state-store=disk`)",
    )

    def validate(self) -> None:
        require(self.round_timeout > 0, "round-timeout", "must be positive (seconds)")
        require(
            self.round_retries >= 0,
            "round-retries",
            "must be >= 0 (times a round with fewer than min-nodes good replies is rerun)",
        )
        require(
            self.max_update_rms > 0,
            "max-update-rms",
            "must be positive (largest root-mean-square entry of an accepted update)",
        )
        require(
            self.max_norm_ratio == 0 or self.max_norm_ratio > 1,
            "max-norm-ratio",
            "must be > 1 (an update this many times the round's median RMS is rejected) "
            "or 0 to turn the check off",
        )
        require(
            self.state_store in STATE_STORES,
            "state-store",
            f"choose one of: {', '.join(STATE_STORES)} (disk: one safetensors file per "
            "client under state-dir)",
        )
        if self.resume:
            require(self.checkpoint, "resume", "needs checkpoint=true")
            require(
                self.state_store == "disk",
                "resume",
                "needs state-store='disk', so that each client's private factors outlive "
                "the interrupted run; rerun both runs with state-store='disk'",
            )


@dataclass(frozen=True)
class OutputSettings(Section):
    """Where a run writes, and what besides its records."""

    title = "Outputs"

    output_dir: str = setting("output-dir", "outputs", "results go to `<output-dir>/<run-name>/`")
    run_name: str = setting("run-name", "", "the run's folder; empty = a timestamped name")
    export_adapters: bool = setting(
        "export-adapters",
        True,
        "after the last round each client writes its PEFT adapters to "
        "`clients/<partition-id>/local-model/` (its last local model) and "
        "`clients/<partition-id>/adapter/` (after the last aggregation)",
    )
    tracker: str = setting(
        "tracker",
        "none",
        "also log the run to an experiment tracker, offline, in the run directory: "
        "`tensorboard`, `mlflow` or `wandb` (the server only; its library must be installed "
        "there, e.g. `pip install 'fedalora[mlflow]'`)",
    )

    def validate(self) -> None:
        require(
            self.tracker in TRACKERS,
            "tracker",
            f"choose one of: {', '.join(TRACKERS)} (where the server also logs the run)",
        )


@dataclass(frozen=True)
class FedConfig(Section):
    """Resolved, validated run configuration: the method (``strategy`` and its
    ``options``) and one section per concern."""

    title = "Method"

    strategy: str = setting(
        "strategy",
        DEFAULT_METHOD,
        "a method of Methods, or your own by import path (`package.module:Class`)",
    )
    run: RunSettings = section(RunSettings)
    data: DataSettings = section(DataSettings)
    model: ModelSettings = section(ModelSettings)
    lora: LoRASettings = section(LoRASettings)
    recipe: LocalRecipe = section(LocalRecipe)
    dp: DPSettings = section(DPSettings)
    robust: RobustSettings = section(RobustSettings)
    faults: FaultSettings = section(FaultSettings)
    outputs: OutputSettings = section(OutputSettings)
    options: MethodOptions = field(default_factory=MethodOptions, metadata={"skip": True})

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Build from a Flower run-config; unknown keys and bad values raise ConfigError."""
        strategy = coerce("strategy", run_config.get("strategy", DEFAULT_METHOD), str)
        options_class = method_class(strategy).Options
        global_keys, own = cls.fields_by_key(), options_class.fields_by_key()
        for key, raw in run_config.items():
            if key not in global_keys and key not in own:
                _check_foreign_option(key, raw, strategy)
        config = dataclasses.replace(
            super().from_run_config(run_config), options=options_class.from_run_config(run_config)
        )
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The run-config mapping that reproduces this configuration."""
        return {**super().to_run_config(), **self.options.to_run_config()}

    def with_strategy(self, strategy: str) -> FedConfig:
        """The same run with another method: global keys kept, options of the new method
        kept where this configuration has them, else at their defaults."""
        global_keys = Section.to_run_config(self)
        own = method_class(strategy).Options.fields_by_key()
        shared = {k: v for k, v in self.options.to_run_config().items() if k in own}
        return FedConfig.from_run_config({**global_keys, **shared, "strategy": strategy})

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every value that can be checked without a model or data: each section's
        own, then what spans sections."""
        method = self.method_class
        require(
            isinstance(self.options, method.Options),
            "strategy",
            f"options {type(self.options).__name__} are not those of '{self.strategy}'; "
            "build the configuration with FedConfig.from_run_config",
        )
        self.options.validate()
        super().validate()
        ranks = self.run.rank_list
        if not method.heterogeneous and len(set(ranks)) > 1:
            raise ConfigError(
                "ranks",
                f"strategy '{self.strategy}' needs one rank for every "
                f"client, got '{self.run.ranks}'; use a single rank or a strategy "
                f"that reconciles ranks: {', '.join(heterogeneous_methods())}",
            )
        groups = self.data.clients_per_group
        if groups > 1 and len(set(ranks)) > 1:
            require(
                groups % len(ranks) == 0,
                "clients-per-group",
                f"{groups} clients per group do not take each of the "
                f"{len(ranks)} ranks '{self.run.ranks}' equally often; use a multiple of "
                f"{len(ranks)}, so that every group has clients of every rank",
            )
        self._validate_method_takes_variants()
        if self.model.quantization != NO_QUANTIZATION:
            require(
                self.lora.variants.lora_init == "default",
                "lora-init",
                "a principal init rewrites the base weights, which quantization="
                f"'{self.model.quantization}' keeps packed; use lora-init='default' or "
                "quantization='none'",
            )
        self._validate_robustness()
        self._validate_privacy()

    def _validate_method_takes_variants(self) -> None:
        for key in self.lora.variants.chosen():
            if key not in self.method_class.accepts:
                able = [n for n, c in registered_methods().items() if key in c.accepts]
                raise ConfigError(
                    key,
                    f"strategy '{self.strategy}' does not take this LoRA "
                    f"variant; methods that do: {', '.join(able) or 'none'}",
                )

    def _validate_robustness(self) -> None:
        if not self.robust.replaces_rule:
            return
        key = "aggregation" if self.robust.aggregation != METHOD_RULE else "clip-norm"
        refusal = self.method.dp_refusal()
        if refusal:
            able = [n for n, c in registered_methods().items() if c.nonlinear_reason is None]
            raise ConfigError(
                key,
                f"strategy '{self.strategy}' cannot be aggregated robustly: {refusal}; "
                f"methods that can: {', '.join(able)} (or use aggregation='{METHOD_RULE}' "
                "and clip-norm=0)",
            )
        require(
            not self.dp.enabled,
            key,
            "client-level DP already clips each client's change to dp-clip and calibrates "
            f"its noise to the mean; keep aggregation='{METHOD_RULE}' and clip-norm=0 under DP",
        )

    def _validate_privacy(self) -> None:
        if not self.dp.enabled:
            return
        require(
            self.robust.weights in (EXAMPLES, UNIFORM),
            "weights",
            "client-level DP weighs every client equally; leave weights at its default",
        )
        refusal = self.method.dp_refusal()
        if refusal:
            able = [n for n, c in registered_methods().items() if c.nonlinear_reason is None]
            raise ConfigError(
                "dp-noise-multiplier",
                f"strategy '{self.strategy}' cannot run under client-level DP: {refusal}; "
                f"methods that can: {', '.join(able)} (or set dp-noise-multiplier=0)",
            )

    # ------------------------------------------------------------ derived
    @property
    def method_class(self) -> type[Method]:
        """The federated method ``strategy`` names."""
        return method_class(self.strategy)

    @functools.cached_property
    def method(self) -> Method:
        """The federated method, set up with its options, the seed, the scaling and the
        LoRA variants."""
        return self.method_class(
            self.options,
            seed=self.run.seed,
            scaling=self.lora.scaling,
            variants=self.lora.variants,
        )


def heterogeneous_methods() -> list[str]:
    """Names of the registered methods that take clients of different ranks."""
    return [name for name, cls in registered_methods().items() if cls.heterogeneous]


def validate_rank(key: str, rank: int, layer_shapes: Mapping[str, tuple[int, int]]) -> None:
    """A rank must be >= 1 and no larger than the smallest adapted layer dimension."""
    if rank < 1:
        raise ConfigError(key, f"rank must be >= 1, got {rank}")
    limit = min(min(shape) for shape in layer_shapes.values())
    if rank > limit:
        raise ConfigError(
            key,
            f"rank {rank} exceeds the smallest adapted layer dimension "
            f"({limit}); use a rank <= {limit}",
        )


def _check_foreign_option(key: str, raw: Any, strategy: str) -> None:
    """A key that is neither global nor the chosen method's: another method's option may
    stay at its default (pyproject.toml lists every built-in option); anything else is
    an error."""
    owners = {
        name: cls.Options.fields_by_key()[key]
        for name, cls in registered_methods().items()
        if key in cls.Options.fields_by_key()
    }
    if not owners:
        own = method_class(strategy).Options.fields_by_key()
        raise ConfigError(key, unknown_key_problem(key, [*FedConfig.fields_by_key(), *own]))
    name, option = next(iter(owners.items()))
    if coerce(key, raw, type(option.default)) != option.default:
        raise ConfigError(
            key,
            f"is an option of {', '.join(owners)}, which strategy "
            f"'{strategy}' does not take; leave it at {option.default!r} or use "
            f"strategy='{name}'",
        )


def key_reference() -> Iterator[str]:
    """The key reference as Markdown: a table per section (key, default, meaning), then
    each registered method's own options."""
    for part in FedConfig.sections():
        own = [f for f in dataclasses.fields(part) if "key" in f.metadata]  # type: ignore[arg-type]
        if not own:
            continue
        yield f"### {part.title}\n"
        yield "| key | default | meaning |"
        yield "|---|---|---|"
        yield from (f"| `{key_of(f)}` | {_shown(f.default)} | {f.metadata['help']} |" for f in own)
        yield ""
    yield "### Method options\n"
    yield "| key | default | method | meaning |"
    yield "|---|---|---|---|"
    for name, cls in registered_methods(built_in=True).items():
        for key, option in cls.Options.fields_by_key().items():
            yield f"| `{key}` | {_shown(option.default)} | `{name}` | {option.metadata['help']} |"


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`" if default != "" else "(empty)"


def manifest_table() -> Iterator[str]:
    """``[tool.flwr.app.config]`` as pyproject.toml declares it: every global key at its
    default, then each built-in method's options at theirs."""
    defaults = FedConfig().to_run_config()
    for cls in registered_methods(built_in=True).values():
        defaults.update(cls.Options().to_run_config())
    for key, value in defaults.items():
        shown = str(value).lower() if isinstance(value, bool) else value
        yield f"{key} = {json.dumps(shown) if isinstance(value, str) else shown}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The run-config keys, from the schema.")
    parser.add_argument("--toml", action="store_true", help="print pyproject.toml's table")
    lines = manifest_table() if parser.parse_args().toml else key_reference()
    sys.stdout.write("\n".join(lines) + "\n")
