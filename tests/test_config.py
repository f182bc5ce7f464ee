from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from fedalora.config import FedConfig, validate_rank
from fedalora.data import load_labelled_dataset
from fedalora.errors import ConfigError
from fedalora.methods import registered_methods
from fedalora.models import adapted_layer_shapes, model_source, resolve_targets
from fedalora.run_config import format_run_config, parse_run_config
from fedalora.scaling import LoRAScaling


def _error(**values: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        FedConfig.from_run_config(values)
    return info.value


@pytest.mark.parametrize(
    "values, key, hint",
    [
        ({"ranks": "8,0,4"}, "ranks", ">= 1"),
        ({"ranks": "8,-2"}, "ranks", ">= 1"),
        ({"ranks": "8;4"}, "ranks", "comma-separated"),
        ({"ranks": "eight"}, "ranks", "comma-separated"),
        ({"intermediate-rank": 0}, "intermediate-rank", "positive"),
        ({"strategy": "fedprox"}, "strategy", "fedalora-hetero"),
        ({"strategy": "fedalora", "ranks": "8,4"}, "ranks", "fedalora-hetero"),
        ({"partitioning": "dirichlet"}, "partitioning", "dirichlet:<alpha>"),
        ({"fraction-train": 1.5}, "fraction-train", "(0, 1]"),
        ({"device": "tpu"}, "device", "cuda"),
        ({"lr": "fast"}, "lr", "number"),
        ({"persist-private": "maybe"}, "persist-private", "true or false"),
        ({"num-rounds": 3}, "num-rounds", "unknown key"),
        ({"strategy": "fedsa-lora", "ranks": "8,4"}, "ranks", "flexlora"),
        ({"strategy": "hetlora", "rank-decay": 0.0}, "rank-decay", "(0, 1]"),
        ({"strategy": "zeropad", "rank-decay": 0.5}, "rank-decay", "strategy='hetlora'"),
        (
            {"strategy": "fedit", "ranks": "8", "intermediate-rank": 8},
            "intermediate-rank",
            "leave it at 16 or use strategy='fedalora-hetero'",
        ),
        ({"strategy": "no.such.module:Method"}, "strategy", "cannot import 'no.such.module'"),
        ({"strategy": "fedalora.config:FedConfig"}, "strategy", "not a Method subclass"),
        ({"strategy": "hetlora", "rank-penalty": -1.0}, "rank-penalty", ">= 0"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(values, key, hint):
    error = _error(**values)
    assert error.key == key
    assert f"run-config '{key}'" in str(error) and hint in str(error)


def test_defaults_are_valid_and_round_trip():
    config = FedConfig.from_run_config({})
    assert config.run.rank_list == [64, 64, 32, 32, 16, 16, 8, 8]
    assert FedConfig.from_run_config(config.to_run_config()) == config
    assert config.run.rank_for(9) == 64  # cycled


def test_single_integer_rank_from_toml_is_accepted():
    assert FedConfig.from_run_config({"strategy": "fedalora", "ranks": 8}).run.rank_list == [8]


def test_another_methods_option_at_its_default_is_accepted():
    """pyproject.toml lists every built-in option, so every run carries them all."""
    config = FedConfig.from_run_config(
        {"strategy": "fedit", "ranks": "8", "intermediate-rank": 16, "rank-decay": 1.0}
    )
    assert config.to_run_config().keys().isdisjoint({"intermediate-rank", "rank-decay"})
    hetero = FedConfig.from_run_config({"intermediate-rank": 4, "ranks": "8"})
    assert hetero.with_strategy("fedit").options.to_run_config() == {}
    assert hetero.with_strategy("fedalora-hetero") == hetero


def test_run_config_text_is_read_as_flower_reads_it():
    assert parse_run_config("strategy='fedalora' ranks='8,4' lr=0.002 bf16=true") == {
        "strategy": "fedalora",
        "ranks": "8,4",
        "lr": 0.002,
        "bf16": True,
    }
    assert parse_run_config("  ") == {}
    with pytest.raises(ConfigError, match=r"run-config 'run-config'.*strings in quotes"):
        parse_run_config("strategy=fedalora")


def test_scaling_conventions():
    assert LoRAScaling("constant", 2.0).scale(64) == 2.0
    assert LoRAScaling("alpha-over-rank", 16.0).scale(8) == 2.0
    assert LoRAScaling("rslora", 16.0).scale(16) == 4.0


def test_rank_above_layer_size_is_rejected():
    shapes = adapted_layer_shapes("minilm", num_hidden_layers=1)
    assert set(shapes.values()) == {(384, 384)}
    validate_rank("ranks", 384, shapes)
    with pytest.raises(ConfigError, match=r"rank 385 exceeds .* <= 384"):
        validate_rank("ranks", 385, shapes)


def test_unknown_model_and_dataset_are_rejected():
    with pytest.raises(ConfigError, match="run-config 'model'"):
        adapted_layer_shapes("./no/such/model")
    with pytest.raises(ConfigError, match=r"run-config 'dataset'.*20newsgroups"):
        load_labelled_dataset("no-such-dataset")
    with pytest.raises(ConfigError, match=r"run-config 'dataset'.*does not exist"):
        load_labelled_dataset("/tmp/definitely-missing.csv")
    with pytest.raises(ConfigError, match="run-config 'target-modules'"):
        adapted_layer_shapes("minilm", targets_spec="q_proj", num_hidden_layers=1)


def test_app_manifest_lists_every_key_with_its_default():
    """Flower refuses run-config keys that pyproject.toml does not declare."""
    import tomllib
    from pathlib import Path

    manifest = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = manifest["tool"]["flwr"]["app"]["config"]
    defaults = FedConfig.from_run_config({})
    assert FedConfig.from_run_config(declared) == defaults
    options = {
        key: field.default
        for cls in registered_methods(built_in=True).values()
        for key, field in cls.Options.fields_by_key().items()
    }
    assert declared == {**defaults.to_run_config(), **options}


def test_every_key_is_declared_once_with_help_and_reaches_the_reference_and_the_manifest():
    import tomllib

    from fedalora.config import key_reference, manifest_table

    own = [key for key, _, _ in FedConfig.settings()]
    assert sorted(own) == sorted(set(own)) and len(own) > 60  # each key in one place
    assert all(field.metadata["help"] for field in FedConfig.fields_by_key().values())
    reference = "\n".join(key_reference())
    assert all(f"| `{key}` |" in reference for key in own)
    manifest = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert tomllib.loads("\n".join(manifest_table())) == manifest["tool"]["flwr"]["app"]["config"]


def test_a_model_path_that_is_not_a_model_says_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"run-config 'model'.*the path .* does not exist"):
        model_source(str(tmp_path / "no-such-model"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a file; give the model's folder \(with config"):
        model_source(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json, so it is not a saved model"):
        model_source(str(tmp_path / "empty"))


def test_target_module_errors_list_the_models_own_linear_layers():
    with pytest.raises(ConfigError, match=r"are named classifier, dense, key, query, value"):
        adapted_layer_shapes("minilm", targets_spec="q_proj", num_hidden_layers=1)

    class OwnFamily(nn.Module):
        config = SimpleNamespace(model_type="own-family")

        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.ModuleDict({"q_lin": nn.Linear(4, 4), "v_lin": nn.Linear(4, 4)})

    with pytest.raises(ConfigError, match=r"no default for model type 'own-family'.*q_lin, v_lin"):
        resolve_targets(OwnFamily(), "auto")


def test_a_method_for_equal_ranks_refuses_different_ones_naming_those_that_take_them():
    with pytest.raises(ConfigError, match="'ranks'") as raised:
        FedConfig.from_run_config({"strategy": "fedit", "ranks": "8,4,2"})
    assert all(name in str(raised.value) for name in ("fedit", "fedalora-hetero", "flexlora"))


def test_formatted_run_config_reads_back_as_written():
    """The launchers' and benchmarks' one writer of --run-config text."""
    values = {"dora": True, "ranks": "8,4 2", "lr": 0.002, "num-server-rounds": 3}
    assert format_run_config(values) == "dora=true ranks='8,4 2' lr=0.002 num-server-rounds=3"
    assert parse_run_config(format_run_config(values)) == values
