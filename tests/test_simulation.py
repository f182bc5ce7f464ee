"""End to end: runs of 3 clients over 2 rounds on a tiny real model (packaged MiniLM cut
to 2 layers), one per strategy and rank setting, checked through the files they write.
One is a real `flwr run` Ray simulation on a shared cluster (a second is killed); the
others run the same ServerApp, strategy and ClientApp in this process
(``server.in_process``, which a test here checks against Ray bit for bit), since Ray's
actor start-up is most of a tiny run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedalora.adapters import load_peft_adapter
from fedalora.launch import ray_cluster
from fedalora.launch.simulate import run_simulation
from fedalora.methods import registered_methods
from fedalora.models import load_base_model
from fedalora.outputs import read_jsonl

from .comm_formulas import ORACLE, Layer, floats_per_layer
from .conftest import TINY_OPTIONS

APP = Path(__file__).resolve().parents[1]
#: 5% of each client's ~740 examples held out (37): scoring both protocols every round
#: was half of a tiny run's time at the default 20%.
TINY = (
    "num-hidden-layers=2 local-steps=3 batch-size=8 max-length=32 dataset='bbc-news' "
    "num-server-rounds=2 lr=0.001 test-fraction=0.05"
)
D_M = TINY_OPTIONS["intermediate-rank"]
BUILT_IN = registered_methods(built_in=True)


def _options(cls) -> str:
    """The tiny runs' method options that this method takes."""
    own = cls.Options.fields_by_key()
    return " ".join(f"{k}={v}" for k, v in TINY_OPTIONS.items() if k in own)


#: Methods that take different ranks but also run with equal ones here: Fed-ALoRA's
#: decomposed layer at equal ranks, and the founding texts' methods.
HOMOGENEOUS_TOO = ("fedalora-hetero", "lori", "masa")
#: run name -> (strategy, ranks, extra run-config): every method heterogeneous where it
#: can be, else homogeneous (and both for HOMOGENEOUS_TOO); one run twice for
#: determinism, the second time with its private state on disk; LoRI-S; and a method
#: written outside the package.
RUNS = {
    f"{name}-{setting}": (name, ranks, _options(cls))
    for name, cls in BUILT_IN.items()
    for setting, ranks in [("homo", "4"), ("hetero", "8,4,2")]
    if (setting == "homo" and name in HOMOGENEOUS_TOO) or (setting == "hetero") == cls.heterogeneous
}
RUNS["lori-s-hetero"] = ("lori", "8,4,2", "lori-sparsity=0.9 lori-calibration-rounds=1")
#: LoRA variants, each beside a method that takes it.
VARIANT_RUNS = {
    "fedalora-dora-homo": ("fedalora", "4", "dora=true dora-magnitude='shared'"),
    "fedalora-lora-plus-homo": ("fedalora", "4", "lora-plus-ratio=16.0"),
    "fedalora-lora-fa-homo": ("fedalora", "4", "lora-fa=true"),
    "fedit-pissa-homo": ("fedit", "4", "lora-init='pissa'"),
}
RUNS.update(VARIANT_RUNS)
#: What a variant adds to its method's shared state: DoRA's magnitude, when shared.
VARIANT_SHARED = {"fedalora-dora-homo": ("lora_magnitude",)}
RUNS["hetlora-hetero"] = ("hetlora", "8,4,2", "rank-decay=0.5 rank-penalty=0.01")
RUNS["fedalora-hetero-again"] = (
    "fedalora-hetero",
    "8,4,2",
    f"intermediate-rank={D_M} state-store='disk'",
)
RUNS["ema-b-hetero"] = ("tests.ema_method:EmaBLoRA", "8,4,2", "")
RUNS["fedalora-hetero-seed-43"] = ("fedalora-hetero", "8,4,2", f"intermediate-rank={D_M} seed=43")
#: Client-level DP (every DP method runs in process in test_privacy too).
RUNS["fedalora-hetero-dp"] = (
    "fedalora-hetero",
    "8,4,2",
    f"intermediate-rank={D_M} dp-noise-multiplier=1.0 dp-clip=0.1",
)
#: The run that goes through `flwr run` on Ray: the private state on disk in Ray's actors
#: (the in-process comparison's run, the killed run's reference, and the in-process
#: ``fedalora-hetero-hetero`` again). Each Ray run costs a start of Ray's actors; every
#: other run is the same apps in process (a method that Ray's workers import by its
#: path runs on the two-node cluster of ``test_deployment``).
RAY_RUNS = ("fedalora-hetero-again",)
#: Methods whose A never leaves the client, and the names of their private tensors.
PRIVATE_A = {
    name: tuple(f".{t}" for t in facts.private if t in ("A", "M", "lora_A"))
    for name, facts in ORACLE.items()
    if {"A", "lora_A"} & facts.private
}
pytestmark = pytest.mark.slow


def _simulate(tmp: Path, name: str, extra: str, ray_address: str | None = None) -> Path:
    return run_simulation(
        APP,
        name,
        num_supernodes=3,
        run_config=f"{TINY} {extra}",
        output_dir=tmp / "outputs",
        flwr_home=tmp / f"flwr-home-{name}",
        num_cpus=2,
        timeout=600,
        log_path=tmp / f"{name}.log",
        ray_address=ray_address,
    )


@pytest.fixture(scope="module")
def shared_ray() -> str:
    """A one-machine Ray cluster that every run joins, so that no run pays Ray's start;
    its 2 CPUs hold one client actor at a time."""
    with ray_cluster(num_cpus=2) as address:
        yield address


def _run_here(tmp: Path, name: str, extra: str) -> Path:
    """One run in this process, its Flower log written where a simulation's goes."""
    from server.in_process import run_in_process

    return run_in_process(
        APP,
        name,
        num_supernodes=3,
        output_dir=tmp / "outputs",
        run_config=f"{TINY} {extra}",
        log_path=tmp / f"{name}.log",
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_ray) -> dict[str, Path]:
    """The Ray runs on one cluster while the others run in this process."""
    tmp = tmp_path_factory.mktemp("sim")
    config = {name: f"strategy='{s}' ranks='{r}' {extra}" for name, (s, r, extra) in RUNS.items()}
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(_simulate, tmp, name, config[name], shared_ray) for name in RAY_RUNS
        }
        here = {name: _run_here(tmp, name, config[name]) for name in RUNS if name not in RAY_RUNS}
        return {**here, **{name: future.result() for name, future in futures.items()}}


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_every_method_completes_and_follows_the_output_contract(runs):
    assert {_config(d)["strategy"] for d in runs.values()} >= set(BUILT_IN)
    for run_dir in runs.values():
        config = _config(run_dir)
        assert [c["client"] for c in config["clients"]] == [0, 1, 2]
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert len(rows) == 2 * 3 * 3  # rounds x clients x (train, local-model, evaluate)
        assert {r["phase"] for r in rows} == {"train", "local-model", "evaluate"}
        for row in rows:
            assert {
                "round",
                "client",
                "rank",
                "phase",
                "num_examples",
                "loss",
                "accuracy",
                "bytes_up",
                "bytes_down",
                "seconds",
            } <= row.keys()
            assert np.isfinite(row["loss"]) and 0 <= row["accuracy"] <= 1
        rounds = read_jsonl(run_dir / "rounds.jsonl")
        assert [r["round"] for r in rounds] == [1, 2]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", run_dir.name
        for protocol in ("local_model", "evaluate"):
            for figure in ("mean", "worst"):
                key = f"{protocol}_{figure}_accuracy"
                assert summary[f"final_{key}"] == rounds[-1][key] is not None
            assert rounds[-1][f"{protocol}_clients"] == 3
        last = [r["accuracy"] for r in rows if r["round"] == 2 and r["phase"] == "local-model"]
        assert rounds[-1]["local_model_mean_accuracy"] == pytest.approx(np.mean(last))
        for client in range(3):  # the model after aggregation, and the last local model
            for folder in ("adapter", "local-model"):
                assert (run_dir / "clients" / str(client) / folder / "adapter_config.json").exists()


def test_bytes_in_metrics_equal_what_each_rule_moves(runs):
    for name, run_dir in runs.items():
        config = _config(run_dir)
        strategy, layers = config["strategy"], config["adapted_layers"].values()
        if strategy not in ORACLE or config.get("lori-sparsity") or name in VARIANT_RUNS:
            continue  # the oracle's rows are plain LoRA and LoRI-D
        if config["dp-noise-multiplier"] > 0:
            continue  # under DP a client sends its update in its download's shapes
        ranks = [c["rank"] for c in config["clients"]]
        rows = read_jsonl(run_dir / "metrics.jsonl")
        for row in (r for r in rows if r["phase"] != "local-model"):  # scored on the client
            first = row["phase"] == "train" and row["round"] == 1
            seen = [
                Layer(row["rank"], ranks, d_out, d_in, D_M, first, row["round"])
                for d_out, d_in in layers
            ]
            up, down = (
                4 * sum(floats_per_layer(strategy, direction, layer) for layer in seen)
                for direction in ("up", "down")
            )
            assert row["bytes_down"] == down, (name, row)
            assert row["bytes_up"] == (up if row["phase"] == "train" else 0), (name, row)
        for summary in read_jsonl(run_dir / "rounds.jsonl"):
            of_round = [r for r in rows if r["round"] == summary["round"]]
            assert summary["bytes_up"] == sum(r["bytes_up"] for r in of_round)
            assert summary["bytes_down"] == sum(r["bytes_down"] for r in of_round)


def test_server_checkpoint_holds_only_the_shared_state(runs):
    base = load_base_model("minilm", 5, num_hidden_layers=2)
    for name, run_dir in runs.items():
        strategy = _config(run_dir)["strategy"]
        if strategy not in ORACLE:
            continue
        modules = _config(run_dir)["adapted_layers"]
        shared = load_file(str(run_dir / "shared_state.safetensors"))
        names = (*ORACLE[strategy].shared, *VARIANT_SHARED.get(name, ()))
        assert set(shared) == {f"{m}.{s}" for m in modules for s in names}
        assert all(np.abs(v).max() > 0 for v in shared.values())  # training reached the server
        if strategy not in PRIVATE_A or not shared:
            continue
        for client in range(3):  # no client's private A appears in the server's checkpoint
            adapter = load_peft_adapter(base.model, run_dir / "clients" / str(client) / "adapter")
            for key, value in adapter.state_dict().items():
                if "lora_A" in key:
                    a = value.numpy()
                    assert not any(
                        v.shape == a.shape and np.allclose(v, a) for v in shared.values()
                    ), (name, key)


def test_logs_never_name_a_private_tensor(runs):
    for name, run_dir in runs.items():
        strategy = _config(run_dir)["strategy"]
        log = (run_dir.parent.parent / f"{name}.log").read_text()
        assert "round 2/2" in log  # the log is the run's own output
        for module in _config(run_dir)["adapted_layers"]:
            assert not any(f"{module}{suffix}" in log for suffix in PRIVATE_A.get(strategy, ()))


def test_same_seed_gives_the_same_run_whichever_state_store(runs):
    files = sorted((runs["fedalora-hetero-again"] / "private-state").iterdir())
    assert [f.name for f in files] == [
        f"client-{k}.round-{t}.safetensors" for k in range(3) for t in (1, 2)
    ]
    assert any(k.endswith(".A") for k in load_file(str(files[0])))
    assert not (runs["fedalora-hetero-hetero"] / "private-state").exists()
    first = load_file(str(runs["fedalora-hetero-hetero"] / "shared_state.safetensors"))
    second = load_file(str(runs["fedalora-hetero-again"] / "shared_state.safetensors"))
    assert all(np.array_equal(first[k], second[k]) for k in first)

    def strip(run):
        rows = [
            {k: v for k, v in row.items() if k != "seconds"}
            for row in read_jsonl(runs[run] / "metrics.jsonl")
        ]
        return sorted(rows, key=lambda row: (row["round"], row["phase"], row["client"]))

    assert strip("fedalora-hetero-hetero") == strip("fedalora-hetero-again")


def test_local_reference_moves_nothing_and_federation_differs_from_it(runs):
    local = read_jsonl(runs["local-hetero"] / "metrics.jsonl")
    assert all(r["bytes_up"] == r["bytes_down"] == 0 for r in local)
    fed = read_jsonl(runs["fedalora-hetero-hetero"] / "metrics.jsonl")
    key = lambda r: (r["round"], r["phase"], r["client"])  # noqa: E731
    local_loss = {key(r): r["loss"] for r in local}
    assert any(local_loss[key(r)] != r["loss"] for r in fed if r["round"] == 2)


def test_a_dp_run_passes_the_clip_check_and_reports_a_rising_epsilon(runs):
    rows = read_jsonl(runs["fedalora-hetero-dp"] / "rounds.jsonl")
    assert [r["rejected"] for r in rows] == [0, 0]
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"]
    summary = json.loads((runs["fedalora-hetero-dp"] / "summary.json").read_text())
    assert summary["epsilon"] == rows[1]["epsilon"] and summary["dp_mode"] == "central"


def test_fairness_notebook_runs_on_tiny_runs_and_renders_its_figures(runs, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    chosen = [
        "fedalora-hetero-hetero",
        "fedalora-hetero-seed-43",
        "zeropad-hetero",
        "local-hetero",
        "fedalora-hetero-dp",
    ]
    monkeypatch.setenv("FEDALORA_RUNS", ":".join(str(runs[n]) for n in chosen))
    notebook = nbformat.read(APP / "notebooks" / "client_fairness.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(APP / "notebooks")}},
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5
    text = "".join(o.get("text", "") for o in outputs)
    assert "protocol: local-model" in text and "(1 found)" in text  # local run, seed 42
    assert "fedalora-hetero (ranks 8,4,2): 2 seed(s)" in text  # two seeds, one method
    assert "zeropad (ranks 8,4,2): 1 seed(s)" in text
    assert "from one seed; no interval, no reading" in text  # never a trend from one seed
    # two seeds give an interval: a reading either resolves a difference or says it did not
    assert "fedalora-hetero (ranks 8,4,2), lowest minus highest rank tier:" in text
    assert "fedalora-hetero (ranks 8,4,2), DP z=1 C=0.1: 1 seed(s)" in text
    assert "noise_multiplier" in text and "epsilon" in text  # the privacy-utility table


def test_the_in_process_mode_gives_the_ray_simulations_results(runs, tmp_path):
    """The same ServerApp, strategy and ClientApp with messages delivered in this
    process: bit-identical shared state and every metric but wall-clock times."""
    from server.in_process import run_in_process

    for name in RAY_RUNS:
        strategy, ranks, extra = RUNS[name]
        run_dir = run_in_process(
            APP,
            name,
            num_supernodes=3,
            output_dir=tmp_path,
            run_config=f"{TINY} strategy='{strategy}' ranks='{ranks}' {extra}",
        )
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        ours, theirs = (
            load_file(str(d / "shared_state.safetensors")) for d in (run_dir, runs[name])
        )
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours), name

        def rows(run):
            return sorted(
                (
                    {k: v for k, v in r.items() if k != "seconds"}
                    for r in read_jsonl(run / "metrics.jsonl")
                ),
                key=lambda r: (r["round"], r["phase"], r["client"]),
            )

        assert rows(run_dir) == rows(runs[name]), name


def test_a_killed_run_resumes_to_the_uninterrupted_result_bit_for_bit(runs, tmp_path, shared_ray):
    """The run is killed (SIGTERM to the launcher, which stops the SuperLink's process
    group) once round 1's checkpoint exists, then resumed from it (in process: the same
    apps, bit for bit, without a second start of Ray's actors)."""
    strategy, ranks, extra = RUNS["fedalora-hetero-again"]
    run_config = f"{TINY} strategy='{strategy}' ranks='{ranks}' {extra}"
    output = tmp_path / "outputs"
    state = output / "killed" / "checkpoint" / "state.json"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedalora.launch.simulate",
            "--app",
            str(APP),
            "--run-name",
            "killed",
            "--num-supernodes",
            "3",
            "--num-cpus",
            "2",
            "--ray-address",
            shared_ray,
            "--output-dir",
            str(output),
            "--run-config",
            run_config,
        ],
        cwd=APP,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (state.exists() and json.loads(state.read_text())["round"] >= 1):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) != 0
    summary = output / "killed" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "completed"
    assert json.loads(state.read_text())["round"] == 1  # killed in round 2

    from server.in_process import run_in_process

    resumed = run_in_process(
        APP,
        "killed",
        num_supernodes=3,
        output_dir=output,
        run_config=f"{run_config} resume=true",
        log_path=tmp_path / "resumed.log",
    )
    whole = runs["fedalora-hetero-again"]
    assert json.loads((resumed / "summary.json").read_text())["resumed_after_round"] == 1
    final, expected = (load_file(str(run / "shared_state.safetensors")) for run in (resumed, whole))
    assert final.keys() == expected.keys()
    assert all(np.array_equal(final[k], expected[k]) for k in expected)
    scores = [
        {
            (r["round"], r["client"], r["phase"]): (r["loss"], r["accuracy"])
            for r in read_jsonl(run / "metrics.jsonl")
        }
        for run in (resumed, whole)
    ]
    assert scores[0] == scores[1]


def test_lori_s_uploads_a_tenth_of_lori_d_once_its_masks_are_fixed(runs):
    """Round 1 calibrates densely (values of every entry plus the packed mask); in round
    2 each client uploads its masked 10% of the values and the mask (1 bit per entry)."""
    sparse, dense = (
        read_jsonl(runs[n] / "metrics.jsonl") for n in ("lori-s-hetero", "lori-hetero")
    )

    def up(rows, server_round):
        return {
            r["client"]: r["bytes_up"]
            for r in rows
            if r["phase"] == "train" and r["round"] == server_round
        }

    for client, full in up(dense, 2).items():
        entries = full // 4  # LoRI-D: every entry of B, float32
        assert up(sparse, 1)[client] == 4 * entries + sum(
            -(-n // 8) for n in _entries_per_layer(runs["lori-s-hetero"], client)
        )
        masked = up(sparse, 2)[client]
        assert masked <= 0.1 * full + entries / 8 + 8 * 4  # values + bit mask (+ rounding)
        assert masked < 0.15 * full


def _entries_per_layer(run_dir, client):
    config = _config(run_dir)
    rank = next(c["rank"] for c in config["clients"] if c["client"] == client)
    return [d_out * rank for d_out, _ in config["adapted_layers"].values()]


def test_a_method_of_ones_own_runs_with_heterogeneous_ranks(runs):
    """``tests.ema_method``, named by import path, trains, aggregates and exports like a
    built-in method: B (padded to rank 8) moves, each client's A stays."""
    run_dir = runs["ema-b-hetero"]
    assert _config(run_dir)["strategy"] == "tests.ema_method:EmaBLoRA"
    shared = load_file(str(run_dir / "shared_state.safetensors"))
    modules = _config(run_dir)["adapted_layers"]
    assert {k: v.shape for k, v in shared.items()} == {f"{m}.lora_B": (384, 8) for m in modules}
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {(r["client"], r["rank"]) for r in rows} == {(0, 8), (1, 4), (2, 2)}
    assert {r["bytes_up"] for r in rows if r["phase"] == "train" and r["client"] == 2} == {
        4 * 384 * 2 * len(modules)
    }


def test_under_ray_a_clients_mistake_reaches_the_console_as_its_headline(tmp_path, shared_ray):
    """Through the console launcher and `flwr run`, the nodes in Ray workers: their
    ConfigError, not Ray's task error, is the console's last line and summary.json's
    error, once (every other mistake of tests/test_user_models.py runs in process)."""
    from .test_user_models import console_run

    lines, summary, headline = console_run(tmp_path, "empty file", "--ray-address", shared_ray)
    assert summary["error"].startswith(f"{headline} [reported by 3 of 3 nodes: ")
    assert lines[-1] == f"run 'console' failed: {summary['error']}"
