"""The one configuration schema of a run, validated in one place.

Every key is a Flower run-config key (``[tool.flwr.app.config]`` in pyproject.toml,
overridable with ``flwr run . --run-config "key=value"``). Values are bool, int,
float or str only, so lists are comma-separated strings. The keys of the chosen
method's own options (``Method.Options``) sit beside the global ones; a key of
another method's options is accepted only at its default value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .data import LOCAL_FORMS, ColumnNames
from .errors import ConfigError, require
from .methods import DEFAULT_METHOD, Method, MethodOptions, method_class, registered_methods
from .models import NO_QUANTIZATION, QUANTIZATIONS, require_bitsandbytes
from .privacy import CENTRAL, DP_MODES, DPSettings
from .robust import AGGREGATIONS, EXAMPLES, METHOD_RULE, UNIFORM, WEIGHTS, RobustSettings
from .run_config import unknown_key_problem
from .scaling import SCALINGS, LoRAScaling
from .tracking import TRACKERS
from .training import LR_SCHEDULES, LocalRecipe
from .variants import DORA_MAGNITUDES, LORA_INITS, Variants

DEVICES = ("auto", "cpu", "cuda")
#: run-config ``local-model-scoring``: every round, or only the last.
EVERY_ROUND, FINAL_ROUND_ONLY = "every-round", "final-round"
LOCAL_MODEL_SCORINGS = (EVERY_ROUND, FINAL_ROUND_ONLY)
STATE_STORES = ("memory", "disk")
_PARTITIONING = re.compile(r"^(iid|task|dirichlet:(?P<alpha>[0-9.eE+-]+))$")


@dataclass(frozen=True)
class FedConfig:
    """Resolved, validated run configuration (field ``x_y`` is run-config key ``x-y``;
    ``options`` holds the chosen method's own keys)."""

    strategy: str = DEFAULT_METHOD
    ranks: str = "64,64,32,32,16,16,8,8"
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    local_model_scoring: str = EVERY_ROUND
    final_evaluation: bool = True
    min_nodes: int = 2
    local_steps: int = 10
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_alpha: float = 2.0
    scaling: str = "constant"
    lora_dropout: float = 0.05
    dora: bool = False
    dora_magnitude: str = "private"
    lora_plus_ratio: float = 1.0
    lora_init: str = "default"
    lora_fa: bool = False
    target_modules: str = "auto"
    model: str = "minilm"
    tokenizer: str = ""
    num_hidden_layers: int = 0
    quantization: str = NO_QUANTIZATION
    reinit_head: bool = False
    dataset: str = "bbc-news"
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    response_column: str = "response"
    task_column: str = "task"
    drop_incomplete_rows: bool = False
    partitioning: str = "dirichlet:0.5"
    clients_per_group: int = 1
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
    tracker: str = "none"
    round_timeout: float = 3600.0
    round_retries: int = 1
    max_update_rms: float = 100.0
    max_norm_ratio: float = 10.0
    weights: str = EXAMPLES
    weight_cap: float = 4.0
    aggregation: str = METHOD_RULE
    trim_fraction: float = 0.1
    clip_norm: float = 0.0
    dp_clip: float = 1.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 0.0
    dp_mode: str = CENTRAL
    dp_target_epsilon: float = 0.0
    dp_secure_noise: bool = False
    checkpoint: bool = True
    resume: bool = False
    options: MethodOptions = field(default_factory=MethodOptions)

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Build from a Flower run-config; unknown keys and bad values raise ConfigError."""
        strategy = _coerce("strategy", run_config.get("strategy", cls.strategy), str)
        options_class = method_class(strategy).Options
        fields, own = _global_keys(), options_class.fields_by_key()
        values: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key in fields:
                values[fields[key].name] = _coerce(key, raw, type(fields[key].default))
            elif key in own:
                options[own[key].name] = _coerce(key, raw, type(own[key].default))
            else:
                _check_foreign_option(key, raw, strategy)
        config = cls(**values, options=options_class(**options))
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The run-config mapping that reproduces this configuration."""
        return {
            **{key: getattr(self, f.name) for key, f in _global_keys().items()},
            **self.options.to_run_config(),
        }

    def with_strategy(self, strategy: str) -> FedConfig:
        """The same run with another method: global keys kept, options of the new method
        kept where this configuration has them, else at their defaults."""
        global_keys = {key: getattr(self, f.name) for key, f in _global_keys().items()}
        own = method_class(strategy).Options.fields_by_key()
        shared = {k: v for k, v in self.options.to_run_config().items() if k in own}
        return FedConfig.from_run_config({**global_keys, **shared, "strategy": strategy})

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every value that can be checked without a model or data."""
        method = self.method_class
        require(
            isinstance(self.options, method.Options),
            "strategy",
            f"options {type(self.options).__name__} are not those of '{self.strategy}'; "
            "build the configuration with FedConfig.from_run_config",
        )
        self.options.validate()
        ranks = self.rank_list  # parses and checks the ranks string
        if not method.heterogeneous and len(set(ranks)) > 1:
            raise ConfigError(
                "ranks",
                f"strategy '{self.strategy}' needs one rank for every "
                f"client, got '{self.ranks}'; use a single rank or a strategy "
                f"that reconciles ranks: {', '.join(heterogeneous_methods())}",
            )
        require(self.num_server_rounds > 0, "num-server-rounds", "must be >= 1")
        require(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        require(
            0.0 <= self.fraction_evaluate <= 1.0,
            "fraction-evaluate",
            "must be in [0, 1]; the last round always evaluates every node (0: only it)",
        )
        require(
            self.local_model_scoring in LOCAL_MODEL_SCORINGS,
            "local-model-scoring",
            f"choose one of: {', '.join(LOCAL_MODEL_SCORINGS)} (when a training client scores "
            "its local model, the paper's protocol)",
        )
        require(
            self.clients_per_group >= 1,
            "clients-per-group",
            "must be >= 1 (clients that share one data group: a task, or one IID or "
            "Dirichlet part)",
        )
        if self.clients_per_group > 1 and len(set(ranks)) > 1:
            require(
                self.clients_per_group % len(ranks) == 0,
                "clients-per-group",
                f"{self.clients_per_group} clients per group do not take each of the "
                f"{len(ranks)} ranks '{self.ranks}' equally often; use a multiple of "
                f"{len(ranks)}, so that every group has clients of every rank",
            )
        require(self.min_nodes >= 1, "min-nodes", "must be >= 1")
        require(self.local_steps > 0, "local-steps", "must be >= 1")
        require(self.batch_size > 0, "batch-size", "must be >= 1")
        require(self.eval_batch_size > 0, "eval-batch-size", "must be >= 1")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(
            self.lr_schedule in LR_SCHEDULES,
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
        self._validate_variants()
        require(self.lora_alpha > 0, "lora-alpha", "must be positive")
        require(self.scaling in SCALINGS, "scaling", f"choose one of: {', '.join(SCALINGS)}")
        require(0.0 <= self.lora_dropout < 1.0, "lora-dropout", "must be in [0, 1)")
        require(
            bool(self.target_modules.strip()),
            "target-modules",
            "give 'auto' or comma-separated module names such as 'query,value'",
        )
        require(
            bool(self.model.strip()),
            "model",
            "give a packaged model ('minilm', 'smollm2'), a Hugging Face id or a local path",
        )
        require(
            self.num_hidden_layers >= 0,
            "num-hidden-layers",
            "must be >= 0 (0 keeps the model's own depth)",
        )
        self._validate_quantization()
        require(
            bool(self.dataset.strip()),
            "dataset",
            f"give a packaged data set, a local {LOCAL_FORMS} or a Hugging Face id",
        )
        self._validate_columns()
        require(
            _PARTITIONING.match(self.partitioning) is not None,
            "partitioning",
            f"got '{self.partitioning}'; allowed: 'iid', 'task', 'dirichlet:<alpha>'",
        )
        if self.partitioning.startswith("dirichlet:"):
            require(self.dirichlet_alpha > 0, "partitioning", "dirichlet alpha must be > 0")
        require(0.0 < self.test_fraction < 1.0, "test-fraction", "must be in (0, 1)")
        require(self.max_length >= 8, "max-length", "must be >= 8 tokens")
        require(
            self.max_new_tokens >= 1,
            "max-new-tokens",
            "must be >= 1 (tokens generated per answer on instruction data)",
        )
        require(
            self.global_test_examples >= 0,
            "global-test-examples",
            "must be >= 0 (0: no scoring on the data set's official test split)",
        )
        require(self.device in DEVICES, "device", f"choose one of: {', '.join(DEVICES)}")
        require(
            self.tracker in TRACKERS,
            "tracker",
            f"choose one of: {', '.join(TRACKERS)} (where the server also logs the run)",
        )
        require(
            self.state_store in STATE_STORES,
            "state-store",
            f"choose one of: {', '.join(STATE_STORES)} (disk: one safetensors file per "
            "client under state-dir)",
        )
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
        self._validate_robustness()
        self._validate_privacy()
        if self.resume:
            require(self.checkpoint, "resume", "needs checkpoint=true")
            require(
                self.state_store == "disk",
                "resume",
                "needs state-store='disk', so that each client's private factors outlive "
                "the interrupted run; rerun both runs with state-store='disk'",
            )

    # ------------------------------------------------------------ derived
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

    @property
    def method_class(self) -> type[Method]:
        """The federated method ``strategy`` names."""
        return method_class(self.strategy)

    def _validate_variants(self) -> None:
        require(
            self.dora_magnitude in DORA_MAGNITUDES,
            "dora-magnitude",
            f"choose one of: {', '.join(DORA_MAGNITUDES)} (DoRA's magnitude vector kept "
            "on the client, or shared and averaged with B)",
        )
        require(
            self.lora_plus_ratio >= 1.0,
            "lora-plus-ratio",
            "must be >= 1 (B's learning rate over A's; 1 turns LoRA+ off; about 16 in "
            "the LoRA+ paper)",
        )
        require(
            self.lora_init in LORA_INITS, "lora-init", f"choose one of: {', '.join(LORA_INITS)}"
        )
        variants = self.variants
        for key in variants.chosen():
            if key not in self.method_class.accepts:
                able = [n for n, c in registered_methods().items() if key in c.accepts]
                raise ConfigError(
                    key,
                    f"strategy '{self.strategy}' does not take this LoRA "
                    f"variant; methods that do: {', '.join(able) or 'none'}",
                )
        require(
            not (variants.dora and variants.lora_init != "default"),
            "lora-init",
            "a principal init (pissa, olora) does not combine with dora here; choose one",
        )
        require(
            not (variants.lora_fa and variants.lora_plus_ratio != 1.0),
            "lora-fa",
            "LoRA-FA and LoRA+ are two optimisers; choose one (lora-fa=false or lora-plus-ratio=1)",
        )

    def _validate_columns(self) -> None:
        key_of: dict[str, str] = {}  # column name -> the key that names it
        for internal, name in dataclasses.asdict(self.columns).items():
            key = f"{internal}-column"
            require(
                bool(name.strip()),
                key,
                f"give the name of the data's {internal} column (default '{internal}')",
            )
            require(
                name not in key_of,
                key,
                f"names the column '{name}', as {key_of.get(name)} does; give each "
                "column key its own column",
            )
            key_of[name] = key

    def _validate_quantization(self) -> None:
        require(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"choose one of: {', '.join(QUANTIZATIONS)} (the frozen base model's weights, "
            "through bitsandbytes)",
        )
        if self.quantization == NO_QUANTIZATION:
            return
        require(
            self.lora_init == "default",
            "lora-init",
            "a principal init rewrites the base weights, which quantization="
            f"'{self.quantization}' keeps packed; use lora-init='default' or quantization='none'",
        )
        require_bitsandbytes(self.quantization)

    def _validate_robustness(self) -> None:
        require(
            self.weights in WEIGHTS,
            "weights",
            f"choose one of: {', '.join(WEIGHTS)} (how much a client's claimed example "
            "count weighs in the aggregate)",
        )
        require(
            self.weight_cap > 1 and math.isfinite(self.weight_cap),
            "weight-cap",
            "must be > 1 (a claim weighs at most this many times the median claim)",
        )
        require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            f"choose one of: {', '.join(AGGREGATIONS)} (the method's rule, or a "
            "coordinate-wise robust statistic of the clients' updates)",
        )
        require(
            0 <= self.trim_fraction < 0.5,
            "trim-fraction",
            "must be in [0, 0.5) (the share of clients cut at each end, entry by entry)",
        )
        require(
            self.clip_norm >= 0 and math.isfinite(self.clip_norm),
            "clip-norm",
            "must be >= 0 (the L2 bound on each client's update; 0: no clipping)",
        )
        if not self.robust.replaces_rule:
            return
        key = "aggregation" if self.aggregation != METHOD_RULE else "clip-norm"
        refusal = self.method.dp_refusal()
        if refusal:
            able = [n for n, c in registered_methods().items() if c.linear]
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
        require(
            self.dp_clip > 0 and math.isfinite(self.dp_clip),
            "dp-clip",
            "must be a positive number (the L2 bound C on each client's update, over all layers)",
        )
        require(
            self.dp_noise_multiplier >= 0 and math.isfinite(self.dp_noise_multiplier),
            "dp-noise-multiplier",
            "must be >= 0 (z: the noise's standard deviation is z * dp-clip; 0 turns DP off)",
        )
        require(
            0 <= self.dp_delta < 1,
            "dp-delta",
            "must be in [0, 1) (0: 1 / number of clients^1.1)",
        )
        require(self.dp_mode in DP_MODES, "dp-mode", f"choose one of: {', '.join(DP_MODES)}")
        require(
            self.dp_target_epsilon >= 0,
            "dp-target-epsilon",
            "must be >= 0 (the run stops before its epsilon would pass it; 0: no target)",
        )
        if self.dp.enabled:
            require(
                self.weights in (EXAMPLES, UNIFORM),
                "weights",
                "client-level DP weighs every client equally; leave weights at its default",
            )
        if not self.dp.enabled:
            require(
                self.dp_target_epsilon == 0,
                "dp-target-epsilon",
                "needs DP on: set dp-noise-multiplier > 0, or dp-target-epsilon=0",
            )
            return
        refusal = self.method.dp_refusal()
        if refusal:
            able = [n for n, c in registered_methods().items() if c.linear]
            raise ConfigError(
                "dp-noise-multiplier",
                f"strategy '{self.strategy}' cannot run under client-level DP: {refusal}; "
                f"methods that can: {', '.join(able)} (or set dp-noise-multiplier=0)",
            )

    @property
    def dp(self) -> DPSettings:
        """Client-level differential privacy (run-config ``dp-*``)."""
        return DPSettings(
            self.dp_clip,
            self.dp_noise_multiplier,
            self.dp_delta,
            self.dp_mode,
            self.dp_target_epsilon,
            self.dp_secure_noise,
        )

    @property
    def robust(self) -> RobustSettings:
        """Aggregation weights and robust aggregation (run-config ``weights``,
        ``weight-cap``, ``aggregation``, ``trim-fraction``, ``clip-norm``)."""
        return RobustSettings(
            self.weights, self.weight_cap, self.aggregation, self.trim_fraction, self.clip_norm
        )

    @property
    def variants(self) -> Variants:
        """The clients' LoRA variants (dora, dora-magnitude, lora-plus-ratio, lora-init,
        lora-fa)."""
        return Variants(
            self.dora, self.dora_magnitude, self.lora_plus_ratio, self.lora_init, self.lora_fa
        )

    @functools.cached_property
    def method(self) -> Method:
        """The federated method, set up with its options, the seed, the scaling and the
        LoRA variants."""
        return self.method_class(
            self.options, seed=self.seed, scaling=self.lora_scaling, variants=self.variants
        )

    @property
    def columns(self) -> ColumnNames:
        """The names of a user data set's columns (run-config ``text-column``,
        ``label-column``, ``instruction-column``, ``response-column``, ``task-column``)."""
        return ColumnNames(
            self.text_column,
            self.label_column,
            self.instruction_column,
            self.response_column,
            self.task_column,
        )

    @property
    def recipe(self) -> LocalRecipe:
        """The clients' local optimiser (run-config lr, lr-schedule, weight-decay,
        max-grad-norm)."""
        return LocalRecipe(self.lr, self.weight_decay, self.max_grad_norm, self.lr_schedule)

    @property
    def lora_scaling(self) -> LoRAScaling:
        """The LoRA scale rule s(r) of run-config ``scaling`` and ``lora-alpha``."""
        return LoRAScaling(self.scaling, self.lora_alpha)

    @property
    def dirichlet_alpha(self) -> float:
        return float(self.partitioning.split(":", 1)[1])


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


def _global_keys() -> dict[str, dataclasses.Field[Any]]:
    """Run-config key -> FedConfig field, for every key that is not a method option."""
    return {
        f.name.replace("_", "-"): f for f in dataclasses.fields(FedConfig) if f.name != "options"
    }


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
        raise ConfigError(key, unknown_key_problem(key, [*_global_keys(), *own]))
    name, option = next(iter(owners.items()))
    if _coerce(key, raw, type(option.default)) != option.default:
        raise ConfigError(
            key,
            f"is an option of {', '.join(owners)}, which strategy "
            f"'{strategy}' does not take; leave it at {option.default!r} or use "
            f"strategy='{name}'",
        )


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
