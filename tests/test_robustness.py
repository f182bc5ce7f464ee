"""One bad client cannot steer the federation: claimed example counts weigh as the
``weights`` policy says, the size screens measure the update each upload applies, a
reply is checked before it is read, robust aggregation is the statistic it names, and a
retried round samples only the nodes online. Pure rules on random arrays, the strategy
on real Flower messages, and hostile nodes in an in-process run."""

import json
import tracemalloc

import numpy as np
import pytest
import scipy.stats
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.attacks import LIE, hostile
from clients.client_app import app as client_app
from fedalora.aggregation import accumulate_decomposed, weighted_average
from fedalora.errors import ConfigError
from fedalora.methods import registered_methods
from fedalora.robust import MEDIAN, TRIMMED_MEAN, RobustSettings, claim_weights, robust_step
from fedalora.screening import product_size, update_size
from server.in_process import run_in_process
from strategies import MethodStrategy, Node
from strategies.protocol import ARRAYS, METRICS, to_numpy, to_record

from .conftest import TINY, sole, tiny_config

LAYERS = {"l0.q": (24, 32), "l0.v": (24, 32)}
LINEAR = [
    name for name, c in registered_methods(built_in=True).items() if c.nonlinear_reason is None
]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _nodes(ranks, claims):
    return [
        Node(partition_id=i, rank=r, num_examples=n, node_id=101 + i)
        for i, (r, n) in enumerate(zip(ranks, claims, strict=True))
    ]


def _strategy(nodes, **overrides):
    config = tiny_config(
        ranks=",".join(str(n.rank) for n in nodes), min_nodes=2, round_retries=0, **overrides
    )
    strategy = MethodStrategy(config, LAYERS)
    strategy.connect(nodes)
    return strategy


def _uploads(strategy, nodes, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return [
        {
            k: (scale * rng.normal(size=s)).astype(np.float32)
            for k, s in strategy.method.upload_shapes(LAYERS, n.rank, 1).items()
        }
        for n in nodes
    ]


def _round(strategy, nodes, uploads, counts=None, server_round=1):
    """One training round over real messages: the strategy's own, each node's reply."""
    messages = list(strategy.configure_train(server_round, strategy.arrays, ConfigRecord(), None))
    assert [m.metadata.dst_node_id for m in messages] == [n.node_id for n in nodes]
    replies = []
    for message, upload, count in zip(
        messages, uploads, counts or [n.num_examples for n in nodes], strict=True
    ):
        record = to_record(upload) if isinstance(upload, dict) else upload
        metrics = MetricRecord(
            {"num_examples": count, "loss": 1.0, "accuracy": 0.5, "seconds": 0.1}
        )
        content = RecordDict({sole(message, ARRAYS): record, sole(message, METRICS): metrics})
        replies.append(Message(content, reply_to=message))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else to_numpy(arrays)


# ------------------------------------------------------------------ pure rules
def test_median_and_trimmed_mean_are_numpys_and_scipys_on_random_updates():
    rng = np.random.default_rng(3)
    shared = {"m.lora_B": rng.normal(size=(5, 4)), "m.lora_A": rng.normal(size=(4, 7))}
    deltas = [{k: rng.normal(size=v.shape) for k, v in shared.items()} for _ in range(9)]
    blocks = [{k: v.shape for k, v in shared.items()}] * 9
    for rule, trim in ((MEDIAN, 0.1), (TRIMMED_MEAN, 0.1), (TRIMMED_MEAN, 0.25)):
        result = robust_step(
            shared, deltas, blocks, [1.0] * 9, RobustSettings(aggregation=rule, trim_fraction=trim)
        )
        for key, current in shared.items():
            stack = np.stack([d[key] for d in deltas])
            statistic = (
                np.median(stack, axis=0)
                if rule == MEDIAN
                else scipy.stats.trim_mean(stack, trim, axis=0)
            )
            np.testing.assert_allclose(result[key], current + statistic, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["method", MEDIAN, TRIMMED_MEAN])
def test_each_entry_is_aggregated_over_the_clients_whose_rank_holds_it(rule):
    """Heterogeneous ranks: client i's delta covers the first r_i rows of A; an entry's
    statistic runs over its holders only, an entry no one holds stays."""
    rng = np.random.default_rng(4)
    ranks, weights = [3, 1, 2, 3, 2, 3], [5.0, 1.0, 2.0, 3.0, 1.0, 4.0]
    shared = {"m.lora_A": rng.normal(size=(4, 6))}
    deltas = [{"m.lora_A": rng.normal(size=(r, 6))} for r in ranks]
    blocks = [{"m.lora_A": (r, 6)} for r in ranks]
    settings = RobustSettings(aggregation=rule, trim_fraction=0.2)
    result = robust_step(shared, deltas, blocks, weights, settings)["m.lora_A"]
    for row in range(4):
        for col in range(6):
            held = [
                (d["m.lora_A"][row, col], w)
                for d, r, w in zip(deltas, ranks, weights, strict=True)
                if row < r
            ]
            values = np.array([v for v, _ in held])
            if not held:
                step = 0.0
            elif rule == MEDIAN:
                step = np.median(values)
            elif rule == TRIMMED_MEAN:
                step = scipy.stats.trim_mean(values, 0.2)
            else:
                step = np.average(values, weights=[w for _, w in held])
            assert result[row, col] == pytest.approx(shared["m.lora_A"][row, col] + step, abs=1e-5)


def test_clip_norm_bounds_each_update_before_the_weighted_mean():
    rng = np.random.default_rng(5)
    shared = {"m.B0": np.zeros((3, 4))}
    deltas = [{"m.B0": rng.normal(size=(3, 4)) * s} for s in (0.1, 1.0, 50.0)]
    weights = [1.0, 2.0, 3.0]
    result = robust_step(
        shared, deltas, [{"m.B0": (3, 4)}] * 3, weights, RobustSettings(clip_norm=1.0)
    )
    clipped = [d["m.B0"] * min(1.0, 1.0 / np.linalg.norm(d["m.B0"])) for d in deltas]
    np.testing.assert_allclose(
        result["m.B0"], np.average(clipped, axis=0, weights=weights), atol=1e-6
    )


def test_the_size_of_s_b_a_is_that_of_the_dense_products():
    rng = np.random.default_rng(6)
    upload = {
        "a.lora_A": rng.normal(size=(3, 7)),
        "a.lora_B": rng.normal(size=(5, 3)),
        "b.lora_A": rng.normal(size=(3, 4)),
        "b.lora_B": rng.normal(size=(6, 3)),
    }
    dense = {m: 0.5 * upload[f"{m}.lora_B"] @ upload[f"{m}.lora_A"] for m in "ab"}
    assert product_size(upload, 0.5) == pytest.approx(update_size(dense), rel=1e-9)


def test_capped_weights_bound_a_claim_at_a_multiple_of_the_median():
    assert claim_weights([100, 110, 120, LIE], "examples", 4.0) == [100, 110, 120, LIE]
    assert claim_weights([100, 110, 120, LIE], "uniform", 4.0) == [1, 1, 1, 1]
    assert claim_weights([100, 110, 120, LIE], "examples-capped", 4.0) == [100, 110, 120, 460]


# ------------------------------------------------- the strategy on real messages
@pytest.mark.parametrize(
    ("policy", "liar_weight"), [("examples", LIE), ("uniform", 1), ("examples-capped", 460)]
)
def test_a_liars_weight_under_each_policy(policy, liar_weight, caplog):
    claims = [100, 110, 120, LIE]
    nodes = _nodes([2, 2, 2, 2], claims)
    strategy = _strategy(nodes, strategy="fedit", weights=policy)
    assert "node 104 (client 3) claims 1000000 training examples" in caplog.text
    uploads = _uploads(strategy, nodes)
    uploads[3] = {k: np.full_like(v, 0.3) for k, v in uploads[3].items()}
    aggregate = _round(strategy, nodes, uploads)
    honest = {"examples": claims, "uniform": [1] * 4, "examples-capped": claims}[policy][:3]
    expected = weighted_average(uploads, [*honest, liar_weight])
    for key, value in expected.items():
        np.testing.assert_allclose(aggregate[key], value, rtol=1e-5, atol=1e-7)


def test_the_default_policy_leaves_the_methods_rule_bit_for_bit(caplog):
    """weights='examples', aggregation='method': the shared state is exactly the rule's."""
    nodes = _nodes([3, 2, 1], [143, 140, 135])
    strategy = _strategy(nodes, strategy="fedalora-hetero")
    before = dict(strategy.shared)
    uploads = _uploads(strategy, nodes)
    aggregate = _round(strategy, nodes, uploads)
    expected = accumulate_decomposed(before, uploads, [143, 140, 135])
    assert all(np.array_equal(aggregate[k], expected[k]) for k in expected)
    assert "claims" not in caplog.text and "rejected" not in caplog.text


def test_a_training_count_unlike_the_discovery_claim_is_refused(caplog):
    nodes = _nodes([2, 2, 2], [100, 110, 120])
    strategy = _strategy(nodes, strategy="fedit")
    uploads = _uploads(strategy, nodes)
    aggregate = _round(strategy, nodes, uploads, counts=[100, 110, 120_000])
    assert "client 2): claims 120000 training examples, but 120 at discovery" in caplog.text
    expected = weighted_average(uploads[:2], [100, 110])
    assert all(np.allclose(aggregate[k], expected[k]) for k in expected)


def test_a_scaled_fedalora_update_is_rejected_by_the_norm_of_its_product(caplog):
    """x9 on both B2 and B1: the factors' RMS is 9 times the median (under the ratio 10),
    the product B2 B1 it adds to B0 is 81 times: rejected, its norm in the log."""
    nodes = _nodes([4, 4, 4, 4], [100, 100, 100, 100])
    strategy = _strategy(nodes, strategy="fedalora-hetero")
    before = dict(strategy.shared)
    uploads = _uploads(strategy, nodes)
    uploads[2] = {k: 9 * v for k, v in uploads[2].items()}
    factor_rms = [update_size(u)[0] for u in uploads]
    assert factor_rms[2] < 10 * np.median(factor_rms)  # what the old screen measured
    product = {m: uploads[2][f"{m}.B2"] @ uploads[2][f"{m}.B1"] for m in LAYERS}
    aggregate = _round(strategy, nodes, uploads)
    norm = update_size(product)[1]
    assert "client 2): its update's RMS entry" in caplog.text
    assert f"(L2 norm {norm:.3g})" in caplog.text and "median L2 norm" in caplog.text
    kept = [uploads[i] for i in (0, 1, 3)]
    expected = accumulate_decomposed(before, kept, [100, 100, 100])
    assert all(np.allclose(aggregate[k], expected[k]) for k in expected)


def test_an_oversized_reply_is_rejected_before_it_is_read(caplog):
    """A 4,000,000 x 2 array where a 2 x 32 one belongs, and a small declared shape
    over 32 MB of data: both rejected, and no array of that size is ever allocated."""
    nodes = _nodes([2, 2, 2, 2], [100, 100, 100, 100])
    strategy = _strategy(nodes, strategy="fedit")
    uploads = _uploads(strategy, nodes)
    huge = np.ones((4_000_000, 2), np.float32)  # 32 MB
    declared = to_record(uploads[2])
    declared["l0.q.lora_A"] = Array(huge)
    lying = to_record(uploads[3])
    lying["l0.q.lora_A"] = Array(
        dtype="float32", shape=(2, 32), stype="numpy.ndarray", data=declared["l0.q.lora_A"].data
    )
    del huge
    tracemalloc.start()
    aggregate = _round(strategy, nodes, [uploads[0], uploads[1], declared, lying])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8_000_000, f"{peak} bytes allocated while screening"
    assert (
        "client 2): 'l0.q.lora_A' declares shape (4000000, 2), over the expected (2, 32)"
        in caplog.text
    )
    assert "client 3): 'l0.q.lora_A' carries 32000128 bytes" in caplog.text
    expected = weighted_average(uploads[:2], [100, 100])
    assert all(np.allclose(aggregate[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", LINEAR)
def test_the_robust_mean_without_clipping_is_each_linear_methods_rule(name):
    """aggregation='method' with a clip-norm no update reaches: the delta path gives the
    method's own aggregate, at heterogeneous ranks where the method takes them."""
    # FFA-LoRA's own rule counts a slot a lower-rank client lacks as zero; the delta
    # path (as DP-FedAvg's step) averages each slot over its holders: same ranks only.
    heterogeneous = registered_methods()[name].heterogeneous and name != "ffa-lora"
    nodes = _nodes([4, 2, 3] if heterogeneous else [3, 3, 3], [100, 150, 120])
    plain, clipped = (
        _strategy(nodes, strategy=name),
        _strategy(nodes, strategy=name, clip_norm=1e9),
    )
    uploads = _uploads(plain, nodes, seed=7)
    expected = _round(plain, nodes, uploads)
    result = _round(clipped, nodes, uploads)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", [MEDIAN, TRIMMED_MEAN])
def test_a_robust_aggregate_ignores_one_hostile_update(rule):
    """Five clients, one sending a huge flipped update (screening off): the median and
    the trimmed mean stay within the honest clients' range, the mean does not."""
    nodes = _nodes([2] * 5, [100] * 5)
    kwargs = {"strategy": "fedalora-hetero", "max_norm_ratio": 0, "max_update_rms": 1e6}
    mean, robust = (
        _strategy(nodes, **kwargs),
        _strategy(nodes, aggregation=rule, trim_fraction=0.2, **kwargs),
    )
    uploads = _uploads(mean, nodes)
    uploads[4] = {k: -30 * v if k.endswith("B2") else v for k, v in uploads[4].items()}
    honest = [{f"{m}.B0": u[f"{m}.B2"] @ u[f"{m}.B1"] for m in LAYERS} for u in uploads[:4]]
    low = {k: np.min([h[k] for h in honest], axis=0) for k in honest[0]}
    high = {k: np.max([h[k] for h in honest], axis=0) for k in honest[0]}
    robust_b0, mean_b0 = _round(robust, nodes, uploads), _round(mean, nodes, uploads)
    for key in low:
        assert np.all(robust_b0[key] >= low[key] - 1e-6) and np.all(
            robust_b0[key] <= high[key] + 1e-6
        )
        assert not np.all(mean_b0[key] >= low[key] - 1e-6)


class _PartlyOnline:
    def __init__(self, online):
        self.online = online

    def get_node_ids(self):
        return self.online


def test_a_round_samples_only_the_nodes_the_grid_reports_online(caplog):
    nodes = _nodes([2, 2, 2], [100, 100, 100])
    strategy = _strategy(nodes, strategy="fedit")
    messages = strategy.configure_train(
        1, strategy.arrays, ConfigRecord(), _PartlyOnline([101, 103])
    )
    assert [m.metadata.dst_node_id for m in messages] == [101, 103]
    online = "sampling among the 2 of 3 clients whose node is online (offline: clients 1)"
    assert online in caplog.text
    every = strategy.configure_train(
        1, strategy.arrays, ConfigRecord(), _PartlyOnline([101, 102, 103])
    )
    assert [m.metadata.dst_node_id for m in every] == [101, 102, 103]


# ----------------------------------------------------------------- run-config
@pytest.mark.parametrize(
    ("overrides", "key", "fix"),
    [
        (
            {"strategy": "flexlora", "ranks": "4", "aggregation": "median"},
            "aggregation",
            "methods that can",
        ),
        (
            {"strategy": "fedit", "ranks": "4", "clip-norm": 1.0, "dp-noise-multiplier": 1.0},
            "clip-norm",
            "under DP",
        ),
        (
            {"weights": "examples-capped", "dp-noise-multiplier": 1.0, "ranks": "4"},
            "weights",
            "equally",
        ),
        ({"aggregation": "mode"}, "aggregation", "median"),
        ({"trim-fraction": 0.5}, "trim-fraction", "[0, 0.5)"),
        ({"weight-cap": 1.0}, "weight-cap", "> 1"),
    ],
)
def test_robustness_keys_are_checked_before_the_run(overrides, key, fix):
    with pytest.raises(ConfigError, match=rf"'{key}'.*{__import__('re').escape(fix)}"):
        tiny_config(**{k.replace("-", "_"): v for k, v in overrides.items()})


# ------------------------------------------------------------ in-process run
def test_hostile_nodes_in_a_real_run_are_capped_and_rejected(tmp_path):
    """An in-process run of 4 nodes: node 101 lies about its count (capped), node 102
    scales its upload by 9 (rejected every round by its product's norm); the run
    completes and its warnings say who did what."""
    app = hostile(hostile(client_app, 101, "count-liar"), 102, "scaled")
    run_config = " ".join(
        f"{k}={json.dumps(v)}"
        for k, v in {**TINY, "num-server-rounds": 2, "ranks": "4,4,2,2"}.items()
    )
    run_dir = run_in_process(
        ".",
        "hostile",
        num_supernodes=4,
        run_config=f"{run_config} weights='examples-capped' min-nodes=2 intermediate-rank=4",
        output_dir=tmp_path,
        node_app=app,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trained_rounds"] == 2
    warnings = (run_dir / "warnings.log").read_text()
    assert f"node 101 (client 1) claims {LIE} training examples" in warnings
    assert "weights='examples-capped' it weighs" in warnings
    for server_round in (1, 2):
        assert (
            f"round {server_round}: rejected update of node 102 (client 2): its update's RMS"
            in warnings
        )
