"""The paper's evaluation protocol and local recipe, and rank separated from data."""

import numpy as np
import pytest
import torch

from fedalora.client import FederatedClient
from fedalora.config import FedConfig
from fedalora.data import load_client_data
from fedalora.errors import ConfigError
from fedalora.training import LocalRecipe

from .conftest import tiny_config


def test_the_reference_recipe_is_the_default():
    recipe = FedConfig.from_run_config({}).recipe
    assert (recipe.weight_decay, recipe.max_grad_norm, recipe.schedule) == (0.0, 1.0, "linear")


def test_the_linear_schedule_ends_at_zero_and_clipping_bounds_the_gradient_norm():
    weight = torch.nn.Parameter(torch.ones(3, 4))
    recipe = LocalRecipe(lr=0.1, max_grad_norm=1.0)
    optimizer, scheduler = recipe.optimiser([weight], steps=5)
    rates = []
    for step in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.full_like(weight, 10.0 * (step + 1))  # norm 34.6 * (step + 1)
        before = float(weight.grad.norm())
        assert recipe.step([weight], optimizer, scheduler) == pytest.approx(before)
        assert float(weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)  # clipped
    np.testing.assert_allclose(rates, [0.1, 0.08, 0.06, 0.04, 0.02])
    assert optimizer.param_groups[0]["lr"] == 0.0  # decayed to 0 by the round's end
    unclipped = LocalRecipe(lr=0.1, max_grad_norm=0.0, schedule="constant")
    optimizer, scheduler = unclipped.optimiser([weight], steps=5)
    weight.grad = torch.full_like(weight, 10.0)
    unclipped.step([weight], optimizer, scheduler)
    assert float(weight.grad.norm()) == pytest.approx(10.0 * np.sqrt(12))
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("strategy, ranks", [("fedalora-hetero", "8,4,2"), ("fedit", "4")])
def test_the_local_model_score_is_that_of_the_model_the_client_uploads_from(strategy, ranks):
    """Rebuilt from what it received, what it uploads and what it keeps, the client's
    trained model scores exactly what the train step reported as its local model."""
    config = tiny_config(strategy=strategy, ranks=ranks)
    client, method = FederatedClient(config, 0, 3, config.run.rank_for(0)), config.method
    shared = method.initial_shared(client.base.layer_shapes(), config.run.rank_list)
    result = client.train(shared, None, 1)
    rebuilt = client.build_adapter(shared, result.private)
    rebuilt.copy_in(result.upload, method.uploads)  # the trained factors it sends
    scores = client.evaluate_adapter(rebuilt)
    assert {k: scores[k] for k in ("loss", "accuracy")} == pytest.approx(
        {k: result.local_model[k] for k in ("loss", "accuracy")}, rel=0, abs=1e-12
    )
    untrained = client.evaluate_adapter(client.build_adapter(shared, None))
    assert untrained["loss"] != result.local_model["loss"]


def test_local_models_can_be_scored_in_the_last_round_only():
    config = tiny_config(
        strategy="fedalora-hetero", ranks="8,4,2", local_model_scoring="final-round"
    )
    client, method = FederatedClient(config, 0, 3, 8), config.method
    shared = method.initial_shared(client.base.layer_shapes(), config.run.rank_list)
    assert client.train(shared, None, 1).local_model == {}
    assert client.train(shared, None, 2, final=True).local_model["num_examples"] > 0


def test_without_aggregation_both_protocols_score_the_same_model():
    config = tiny_config(strategy="local", ranks="8,4,2")
    client = FederatedClient(config, 1, 3, 4)
    result = client.train({}, None, 1)
    after, _ = client.evaluate({}, result.private, 1)
    assert after["loss"] == result.local_model["loss"]
    assert after["accuracy"] == result.local_model["accuracy"]


def test_groups_give_every_task_clients_of_every_rank_on_one_task_each():
    """8 tasks x 3 clients at ranks 64, 16, 8: clients 3t, 3t+1, 3t+2 split task t's
    examples between them (equal shares) and have the three ranks."""
    from collections import Counter

    from fedalora.models import load_base_model

    config = FedConfig.from_run_config(
        {
            "ranks": "64,16,8",
            "dataset": "instructions",
            "partitioning": "task",
            "clients-per-group": 3,
        }
    )
    tokenizer = load_base_model("smollm2", 0, num_hidden_layers=1).tokenizer

    def prompts(partition, clients, per_group):
        data = load_client_data(
            "instructions", "task", partition, clients, 0.2, 42, tokenizer, 48, per_group
        )
        return Counter(map(tuple, data.train["prompt_ids"] + data.test["prompt_ids"]))

    for task in (0, 5):
        members = [prompts(3 * task + m, 24, 3) for m in range(3)]
        assert sum(members, Counter()) == prompts(task, 8, 1)  # the task, split
        assert max(m.total() for m in members) - min(m.total() for m in members) <= 1
        assert [config.run.rank_for(3 * task + m) for m in range(3)] == [64, 16, 8]


def test_groups_must_divide_the_clients_and_take_every_rank():
    with pytest.raises(ConfigError, match=r"'clients-per-group'.*multiple of 3"):
        FedConfig.from_run_config({"ranks": "64,16,8", "clients-per-group": 2})
    config = tiny_config(strategy="fedalora-hetero", ranks="8,4", clients_per_group=2)
    with pytest.raises(ConfigError, match="'clients-per-group': 3 clients do not split"):
        FederatedClient(config, 0, 3, 8)
