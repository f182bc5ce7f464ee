"""Client-level differential privacy: clipping, the noise's size, the accountant against
dp-accounting, the server's own check of the clip bound, refusals before training,
determinism and resume (scripted nodes), and a tiny DP run of every method that takes
DP, homogeneous and heterogeneous."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from fedalora.checkpoint import load_checkpoint, save_checkpoint
from fedalora.errors import ConfigError
from fedalora.methods import registered_methods
from fedalora.outputs import read_jsonl
from fedalora.privacy import (
    NOISE_STREAM,
    ClientLevelAccountant,
    DPSettings,
    clip_to_norm,
    global_norm,
    private_mean_update,
)
from strategies import PrivateMethodStrategy

from .comm_formulas import ORACLE
from .conftest import TINY_OPTIONS, tiny_config
from .test_faults import (
    LAYERS,
    NODES,
    ScriptedGrid,
    discover,
    make_strategy,
    run_all,
    task_identity,  # noqa: F401 - the scripted nodes' Flower task identity (autouse)
)

CLIP, Z = 0.5, 1.2
DP = {"dp_clip": CLIP, "dp_noise_multiplier": Z}
LINEAR = [
    name for name, cls in registered_methods(built_in=True).items() if cls.nonlinear_reason is None
]


def dp_update(norm_of: dict[int, float] | None = None):
    """Scripted nodes' DP uploads: a random update in the method's ``delta_shapes`` with
    norm 0.8 C (or ``norm_of[node]`` times C), depending on the node and the round."""

    def update(strategy, node_id: int, server_round: int, shared: dict) -> dict:
        _, rank, _ = NODES[node_id]
        rng = np.random.default_rng([node_id, server_round, 7])
        shapes = strategy.method.delta_shapes(LAYERS, rank)
        raw = {k: rng.normal(size=s) for k, s in shapes.items()}
        target = (norm_of or {}).get(node_id, 0.8) * CLIP
        factor = target / global_norm(raw)
        return {k: (v * factor).astype(np.float32) for k, v in raw.items()}

    return update


def dp_run(tmp_path: Path, update=None, name: str = "fedalora-hetero", **overrides):
    strategy = make_strategy(tmp_path, name, **{**DP, **overrides})
    assert isinstance(strategy, PrivateMethodStrategy)
    grid = ScriptedGrid(strategy, update=update or dp_update())
    discover(strategy, grid)
    run_all(strategy, grid)
    return strategy, grid


# ------------------------------------------------------------------ pure rules
def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    big = {"a": rng.normal(size=(30, 7)), "b": rng.normal(size=(5,))}
    clipped = clip_to_norm(big, 0.25)
    assert global_norm(clipped) == pytest.approx(0.25, rel=1e-6)
    assert np.allclose(clipped["a"] / big["a"], clipped["b"][0] / big["b"][0])  # one factor
    small = {"a": np.full((2, 2), 0.01, np.float32)}
    assert np.array_equal(clip_to_norm(small, 1.0)["a"], small["a"])


def test_the_noise_on_the_sum_has_standard_deviation_z_times_c():
    """200,000 draws: the sample standard deviation's own relative error is about
    1 / sqrt(2n) = 0.16 %, so a 1 % tolerance is over six of those."""
    shape = (400, 500)
    std = Z * CLIP
    step = private_mean_update(
        {"x": np.zeros(shape, np.float32)},
        [],
        [{"x": shape}],
        1.0,
        std,
        np.random.default_rng(1),
    )["x"].astype(np.float64)
    assert step.std() == pytest.approx(std, rel=0.01)
    assert abs(step.mean()) < 5 * std / np.sqrt(step.size)


def test_local_mode_noises_each_upload_and_central_mode_only_clips():
    update = {"x": np.zeros((400, 500), np.float32)}
    local = DPSettings(CLIP, Z, mode="local").client_upload(update, np.random.default_rng(2))
    assert local["x"].std() == pytest.approx(Z * CLIP, rel=0.01)
    big = {"x": np.ones((3, 3), np.float32)}
    central = DPSettings(CLIP, Z).client_upload(big, np.random.default_rng(2))
    assert np.allclose(central["x"], CLIP / 3)  # the clipped update, no noise


def test_each_rank_slot_is_divided_by_its_expected_holders():
    """Zero-padding's A (rank x d_in) under DP: slot j sums the clients that hold it and
    divides by q times the clients of the federation that hold it; a slot nobody holds
    stays as it was."""
    shared = {"l.lora_A": np.full((4, 2), 5.0, np.float32)}
    holders = [{"l.lora_A": (r, 2)} for r in (3, 2, 1, 2)]  # slots held by 4, 3, 1, 0
    updates = [
        {"l.lora_A": np.ones((3, 2), np.float32)},
        {"l.lora_A": np.ones((1, 2), np.float32)},
    ]
    result = private_mean_update(shared, updates, holders, 0.5, 0.0, np.random.default_rng(0))
    # sums over the updates [2, 1, 1, 0], holders [4, 3, 1, 0]
    expected_step = np.array([2 / (0.5 * 4), 1 / (0.5 * 3), 1 / (0.5 * 1), 0.0])
    assert np.allclose(result["l.lora_A"], 5.0 + expected_step[:, None])


@pytest.mark.parametrize(
    ("z", "num_clients", "sample_size", "rounds", "mode"),
    [(1.1, 100, 10, 20, "central"), (2.0, 4, 4, 5, "central"), (3.0, 8, 2, 7, "local")],
)
def test_epsilon_equals_dp_accountings_own_value(z, num_clients, sample_size, rounds, mode):
    delta = 1e-5
    reference = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    gaussian = dp_accounting.GaussianDpEvent(z / 2)  # sensitivity 2C under replace-one
    sampled = sample_size < num_clients and mode == "central"
    event = (
        dp_accounting.SampledWithoutReplacementDpEvent(num_clients, sample_size, gaussian)
        if sampled
        else gaussian
    )
    reference.compose(event, rounds)
    ours = ClientLevelAccountant(z, delta, num_clients, sample_size, mode)
    assert ours.epsilon_after(rounds) == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert 0 < ours.epsilon_after(1) < ours.epsilon_after(rounds)


# --------------------------------------------------------- the server's side
def test_the_server_rejects_an_update_over_the_clip_bound(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    strategy, _ = dp_run(tmp_path, dp_update({103: 3.0}), num_server_rounds=1)
    assert "exceeds dp-clip=0.5: the client did not clip it" in caplog.text
    assert read_jsonl(tmp_path / "rounds.jsonl")[0]["rejected"] == 1

    reference = make_strategy(tmp_path / "reference", **DP, num_server_rounds=1)
    discover(reference, ScriptedGrid(reference))
    updates = [
        dp_update()(reference, node_id, 1, reference.shared)
        for node_id in sorted(NODES)
        if node_id != 103
    ]
    expected = private_mean_update(
        reference.shared,
        updates,
        [reference.method.delta_shapes(LAYERS, n.rank) for n in reference.clients.values()],
        1.0,
        Z * CLIP,
        np.random.default_rng([reference.config.run.seed, 1, 0, NOISE_STREAM]),
    )
    for key in expected:
        assert np.array_equal(strategy.shared[key], expected[key])


def test_a_dp_run_is_reproducible_and_reports_a_rising_epsilon(tmp_path):
    first, _ = dp_run(tmp_path / "a", num_server_rounds=3)
    second, _ = dp_run(tmp_path / "b", num_server_rounds=3)
    for key in first.shared:
        assert np.array_equal(first.shared[key], second.shared[key])
    rows = read_jsonl(tmp_path / "a" / "rounds.jsonl")
    epsilons = [row["epsilon"] for row in rows]
    assert epsilons == [row["epsilon"] for row in read_jsonl(tmp_path / "b" / "rounds.jsonl")]
    accountant = ClientLevelAccountant(Z, 1 / 4**1.1, 4, 4)
    assert epsilons == [accountant.epsilon_after(k) for k in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2]
    other_seed, _ = dp_run(tmp_path / "c", num_server_rounds=3, seed=7)
    assert not np.array_equal(first.shared["l0.q.B0"], other_seed.shared["l0.q.B0"])


def test_resume_reports_the_same_epsilon_as_an_uninterrupted_run(tmp_path):
    def fresh(folder: str, rounds: int):
        strategy = make_strategy(
            tmp_path / folder, **DP, num_server_rounds=rounds, fraction_train=0.5
        )
        grid = ScriptedGrid(strategy, update=dp_update())
        discover(strategy, grid)
        return strategy, grid

    whole, grid = fresh("whole", 4)
    run_all(whole, grid)
    killed, grid = fresh("killed", 2)
    run_all(
        killed,
        grid,
        on_round_end=lambda r: save_checkpoint(tmp_path / "killed", killed.checkpoint(r)),
    )
    saved = load_checkpoint(tmp_path / "killed")
    assert saved.strategy["privacy"]["releases"] == 2
    resumed, grid = fresh("killed", 4)
    resumed.restore(saved)
    run_all(resumed, grid, first_round=3)
    assert resumed.summary_fields() == whole.summary_fields()
    assert resumed.ledger == whole.ledger
    for key in whole.shared:
        assert np.array_equal(resumed.shared[key], whole.shared[key])


def test_a_target_epsilon_ends_the_run_before_it_is_passed(tmp_path):
    accountant = ClientLevelAccountant(Z, 1 / 4**1.1, 4, 4)
    target = (accountant.epsilon_after(2) + accountant.epsilon_after(3)) / 2
    strategy, _ = dp_run(tmp_path, num_server_rounds=5, dp_target_epsilon=target)
    assert strategy.num_rounds == 2
    assert "allows 2 of the 5 rounds" in strategy.stopped
    rows = read_jsonl(tmp_path / "rounds.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["epsilon"] <= target
    with pytest.raises(ConfigError, match=r"dp-target-epsilon.*one round already costs"):
        dp_run(tmp_path / "none", dp_target_epsilon=accountant.epsilon_after(1) / 2)


def test_a_retried_round_spends_budget_and_the_run_stops_before_passing_it(tmp_path):
    """Round 1 fails once (every reply lost) and is retried: two releases, so the run
    planned for two rounds stops before round 2's attempt."""
    accountant = ClientLevelAccountant(Z, 1 / 4**1.1, 4, 4)
    target = (accountant.epsilon_after(2) + accountant.epsilon_after(3)) / 2
    strategy = make_strategy(tmp_path, **DP, num_server_rounds=3, dp_target_epsilon=target)
    lost = {(node, 1, 1): (lambda reply, update: None) for node in NODES}
    grid = ScriptedGrid(strategy, lost, update=dp_update())
    discover(strategy, grid)
    run_all(strategy, grid)
    assert strategy.ledger.releases == 2 and strategy.shared_round == 1
    assert "dp-target-epsilon" in strategy.stopped and "one more round" in strategy.stopped
    assert read_jsonl(tmp_path / "rounds.jsonl")[-1]["epsilon"] <= target


def test_local_mode_adds_no_server_noise_and_accounts_each_clients_uploads(tmp_path):
    strategy, _ = dp_run(tmp_path, dp_mode="local", num_server_rounds=2, fraction_train=0.5)
    participations = strategy.ledger.participations
    assert sum(participations.values()) == 4  # two of four clients, two rounds
    expected = ClientLevelAccountant(Z, 1 / 4**1.1, 4, 2, "local").epsilon_after(
        max(participations.values())
    )
    assert strategy.summary_fields()["epsilon"] == expected


@pytest.mark.parametrize(
    ("num_clients", "delta", "weak"),
    [(3, 0.0, True), (1000, 0.0, True), (3, 0.05, True), (3, 1e-5, False), (1000, 1e-5, False)],
)
def test_a_delta_not_well_below_one_over_n_is_named_with_the_fix(num_clients, delta, weak):
    """N x delta > 0.1 is weak; the default 1 / N^1.1 always is (N x delta = N^-0.1)."""
    problem = DPSettings(noise_multiplier=Z, delta=delta).delta_problem(num_clients)
    assert (problem is not None) == weak
    if delta == 0 and num_clients == 3:
        assert problem.startswith("delta 1/N^1.1 = 0.299 is not well below 1/N for N=3 ")
        assert "set dp-delta to at most 0.1/N = 0.033, e.g. 1e-5" in problem


@pytest.mark.parametrize(("delta", "weak"), [(0.0, True), (1e-5, False)])
def test_the_server_warns_at_connect_and_summary_json_says_so(tmp_path, caplog, delta, weak):
    caplog.set_level(logging.WARNING)
    strategy = make_strategy(tmp_path, **DP, dp_delta=delta)
    discover(strategy, ScriptedGrid(strategy))
    assert ("is not well below 1/N for N=4 clients" in caplog.text) == weak
    assert strategy.summary_fields()["dp_delta_too_large"] == weak


# -------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"strategy": "flexlora", "ranks": "4,2"}, "SVD of the summed products"),
        ({"strategy": "flora", "ranks": "4,2"}, "stacked factors publish"),
        ({"strategy": "hetlora", "ranks": "4,2"}, "weights are the updates' own norms"),
        ({"strategy": "local", "ranks": "4"}, "shares nothing"),
        ({"strategy": "lori", "ranks": "4", "lori_sparsity": 0.9}, "LoRI-S uploads"),
        ({"strategy": "fedit", "ranks": "4", "lora_init": "pissa"}, "derives from the base"),
    ],
)
def test_methods_dp_cannot_protect_are_refused_before_training(overrides, reason):
    with pytest.raises(ConfigError, match="dp-noise-multiplier") as raised:
        tiny_config(**DP, **overrides)
    assert reason in str(raised.value)
    assert "methods that can: " in str(raised.value) and "fedalora-hetero" in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dp_clip": 0.0}, "dp-clip"),
        ({"dp_noise_multiplier": -1.0}, "dp-noise-multiplier"),
        ({"dp_delta": 1.0}, "dp-delta"),
        ({"dp_mode": "shuffle"}, "dp-mode"),
        ({"dp_target_epsilon": -2.0}, "dp-target-epsilon"),
    ],
)
def test_bad_dp_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        tiny_config(**{**DP, **overrides})


def test_a_target_epsilon_without_noise_is_refused():
    with pytest.raises(ConfigError, match=r"'dp-target-epsilon'.*needs DP on"):
        tiny_config(dp_target_epsilon=3.0)


@pytest.mark.parametrize("name", LINEAR)
def test_under_dp_only_shared_state_tensors_go_up(name):
    """A DP upload has the shapes of the client's download: no private factor, at any
    rank."""
    config = tiny_config(strategy=name, ranks="4", **DP)
    method = config.method
    private = ORACLE[name].private
    for rank in (4, 2):
        sent = {key.rsplit(".", 1)[1] for key in method.delta_shapes(LAYERS, rank)}
        assert sent <= set(method.downloads) and not sent & private


# ------------------------------------------------------------------ end to end
RUNS = [
    (name, ranks)
    for name in LINEAR
    for ranks in ("4", "8,4,2")
    if ranks == "4" or registered_methods()[name].heterogeneous
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "ranks"), RUNS)
def test_a_tiny_dp_run_completes_for_every_method_that_takes_dp(tmp_path, name, ranks):
    """Real clients (packaged MiniLM cut to 2 layers) in process: every upload passes the
    server's clip check, and epsilon rises round by round."""
    from server.in_process import run_in_process

    cls = registered_methods()[name]
    options = " ".join(
        f"{k}={v}" for k, v in TINY_OPTIONS.items() if k in cls.Options.fields_by_key()
    )
    run_dir = run_in_process(
        Path(__file__).resolve().parents[1],
        f"dp-{name}",
        num_supernodes=3,
        output_dir=tmp_path,
        run_config=(
            "num-hidden-layers=2 local-steps=2 batch-size=8 max-length=32 dataset='bbc-news' "
            f"num-server-rounds=2 lr=0.001 fraction-evaluate=0.0 export-adapters=false "
            "final-evaluation=false test-fraction=0.05 "
            f"strategy='{name}' ranks='{ranks}' dp-noise-multiplier=1.0 dp-clip=0.1 {options}"
        ),
    )
    rows = read_jsonl(run_dir / "rounds.jsonl")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["rejected"] for r in rows] == [0, 0] and [r["failed"] for r in rows] == [0, 0]
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"]
