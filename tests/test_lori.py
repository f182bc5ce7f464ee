"""LoRI: exact per-entry aggregation over mask holders, the calibrated global mask, and
training and uploading under it."""

import numpy as np
import pytest
import torch

from fedalora.aggregation import masked_average
from fedalora.client import FederatedClient
from fedalora.methods import Participant
from fedalora.methods.lora_factors import seeded_lora_a

from .conftest import tiny_config


def test_each_entry_is_averaged_over_the_clients_whose_mask_keeps_it():
    rng = np.random.default_rng(0)
    ranks, counts, d_out = [4, 2, 3], [10, 30, 60], 5
    factors = [rng.normal(size=(d_out, r)) for r in ranks]
    masks = [rng.random((d_out, r)) < 0.5 for r in ranks]
    result = masked_average(factors, masks, counts, 4)
    for o in range(d_out):
        for j in range(4):
            holders = [i for i, r in enumerate(ranks) if j < r and masks[i][o, j]]
            expected = (
                (
                    sum(counts[i] * factors[i][o, j] for i in holders)
                    / sum(counts[i] for i in holders)
                )
                if holders
                else 0.0
            )
            assert result[o, j] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_with_one_mask_the_aggregate_times_the_shared_a_is_exact():
    rng = np.random.default_rng(1)
    a = seeded_lora_a(3, "layer", 4, 6).astype(np.float64)
    mask = rng.random((5, 4)) < 0.3
    factors = [np.where(mask, rng.normal(size=(5, 4)), 0.0) for _ in range(3)]
    p = np.array([1.0, 2.0, 5.0]) / 8
    aggregate = masked_average(factors, [mask] * 3, [1, 2, 5], 4).astype(np.float64)
    np.testing.assert_allclose(
        aggregate @ a,
        sum(pi * f @ a for pi, f in zip(p, factors, strict=True)),
        rtol=1e-5,
        atol=1e-7,
    )


def _client(**options):
    config = tiny_config(
        strategy="lori", ranks="8,4,2", lori_sparsity=0.9, lori_calibration_rounds=1, **options
    )
    client = FederatedClient(config, 0, 3, 8)
    shared = config.method.initial_shared(client.base.layer_shapes(), [8, 4, 2])
    return config, client, shared


def test_the_mask_is_calibrated_once_over_all_layers_and_training_stays_under_it():
    config, client, shared = _client()
    method, layers = config.method, client.base.layer_shapes()
    first = client.train(shared, None, 1)  # calibration: dense upload, mask fixed after
    masks = {k: v for k, v in first.private.items() if k.startswith("state.mask.")}
    total = sum(d_out * 8 for d_out, _ in layers.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)  # one global top 10%
    dense_values = sum(v.size for k, v in first.upload.items() if k.endswith("values"))
    assert dense_values == total  # every entry in the calibration round
    assert _problem(method, layers, first.upload) is None

    # round 2 restarts from B = 0 under the mask: after training, B is zero off the mask
    aggregate = method.aggregate(shared, [first.upload], [Participant(0, 8, 100)])
    adapter = client.build_adapter(
        method.download(aggregate, Participant(0, 8, 100)),
        first.private,
        shared_round=1,
        server_round=2,
    )
    assert all(float(adapter.tensors()[f"{m}.lora_B"].detach().abs().sum()) == 0 for m in layers)
    second = client.train(
        method.download(aggregate, Participant(0, 8, 100)), first.private, 2, shared_round=1
    )
    assert _problem(method, layers, second.upload) is None
    kept = sum(v.size for k, v in second.upload.items() if k.endswith("values"))
    assert kept == round(0.1 * total)
    decoded = method.aggregate(shared, [second.upload], [Participant(0, 8, 100)])
    for m in layers:
        mask = masks[f"state.mask.{m}"].numpy().astype(bool)
        b = decoded[f"{m}.lora_B"]
        assert np.all(b[~mask] == 0) and np.any(b[mask] != 0)
    # the masked upload: 10% of the values plus one bit per entry
    dense_bytes = 4 * total
    sparse_bytes = sum(v.nbytes for v in second.upload.values())
    assert sparse_bytes <= 0.1 * dense_bytes + total / 8 + len(layers)


def test_a_corrupt_sparse_upload_is_refused():
    config, client, shared = _client()
    method, layers = config.method, client.base.layer_shapes()
    upload = client.train(shared, None, 1).upload
    module = next(iter(layers))
    short = {**upload, f"{module}.lora_B.values": upload[f"{module}.lora_B.values"][:-1]}
    assert "shape" in _problem(method, layers, short)
    floats = {**upload, f"{module}.lora_B.mask": upload[f"{module}.lora_B.mask"].astype(float)}
    assert "packed into uint8" in _problem(method, layers, floats)
    assert "keys differ" in _problem(method, layers, {})


def test_lori_a_is_the_shared_seeded_a_and_frozen():
    config, client, shared = _client()
    adapter = client.build_adapter(shared, None)
    for m in client.base.targets:
        a = adapter.tensors()[f"{m}.lora_A"]
        assert not a.requires_grad
        expected = seeded_lora_a(config.run.seed, m, 8, a.shape[1])
        assert torch.equal(a.detach(), torch.from_numpy(expected))


def test_a_lori_s_client_exports_its_effective_dense_factors(tmp_path):
    """After calibration, under its mask, the exported PEFT adapter reproduces it."""
    from fedalora.adapters import load_peft_adapter
    from fedalora.data import collate

    config, client, shared = _client()
    method, me = config.method, Participant(0, 8, 100)
    first = client.train(method.download(shared, me), None, 1)
    aggregate = method.aggregate(shared, [first.upload], [me])
    second = client.train(method.download(aggregate, me), first.private, 2, shared_round=1)
    final = method.aggregate(aggregate, [second.upload], [me])
    client.export(method.download(final, me), second.private, tmp_path / "adapter", 2, 2)
    exported = load_peft_adapter(client.base.model, tmp_path / "adapter").eval()
    ours = client.build_adapter(method.download(final, me), second.private, 2, 2).model.eval()
    batch = collate(client.data.test, list(range(4)), client.base.tokenizer, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(**batch).logits, ours(**batch).logits, atol=1e-4, rtol=1e-4
        )


def _problem(method, layers, upload):
    """What the server's screen says of a rank-8 upload."""
    return method.upload_format().problem(method.upload_shapes(layers, 8, 1), upload)
