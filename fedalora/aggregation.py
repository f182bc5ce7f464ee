"""Aggregation rules as pure functions over numpy arrays (no Flower, no model).

Each update is a mapping from array name to array; weights are the clients' example
counts and are normalised here to p_i = n_i / sum(n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def data_weights(num_examples: Sequence[float]) -> np.ndarray:
    """p_i = n_i / sum(n); raises ValueError on negative counts or a zero total."""
    counts = np.asarray(num_examples, dtype=np.float64)
    if counts.size == 0 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError("example counts must be >= 0 with a positive total, "
                         f"got {counts.tolist()}")
    return counts / counts.sum()


def weighted_average(updates: Sequence[Arrays],
                     num_examples: Sequence[float]) -> dict[str, np.ndarray]:
    """Homogeneous Fed-ALoRA (and FedAvg): X <- sum_i p_i X_i for every key.

    All updates must carry the same keys with the same shapes.
    """
    weights = data_weights(num_examples)
    keys = set(updates[0])
    for update in updates[1:]:
        if set(update) != keys:
            raise ValueError("updates carry different keys; cannot average")
    return {key: sum(w * np.asarray(u[key], dtype=np.float64) for w, u in zip(weights, updates))
            .astype(np.float32) for key in updates[0]}


def accumulate_decomposed(b0: Arrays, updates: Sequence[Arrays],
                          num_examples: Sequence[float]) -> dict[str, np.ndarray]:
    """Heterogeneous Fed-ALoRA: B0 <- B0 + sum_i p_i B2_i @ B1_i, layer by layer.

    ``b0`` maps ``<module>.B0`` to d_out x d_m; each update maps ``<module>.B2``
    (d_out x r_i) and ``<module>.B1`` (r_i x d_m). Ranks may differ between updates:
    every product B2_i B1_i is d_out x d_m.
    """
    weights = data_weights(num_examples)
    result: dict[str, np.ndarray] = {}
    for key, current in b0.items():
        module = key[: -len(".B0")]
        total = np.asarray(current, dtype=np.float64).copy()
        for w, update in zip(weights, updates):
            b2 = np.asarray(update[f"{module}.B2"], dtype=np.float64)
            b1 = np.asarray(update[f"{module}.B1"], dtype=np.float64)
            total += w * (b2 @ b1)
        result[key] = total.astype(np.float32)
    return result
