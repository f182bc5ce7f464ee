"""Aggregation rules as pure functions over numpy arrays (no Flower, no model).

An update maps array names to arrays: ``<module>.lora_A`` (r_i x d_in) and
``<module>.lora_B`` (d_out x r_i) for the LoRA rules, ``<module>.B2``/``<module>.B1``
for Fed-ALoRA's decomposition. Every rule is applied layer by layer. Weights are
the clients' example counts, normalised here to p_i = n_i / sum(n); ``scales`` are
the clients' LoRA scales s_i, so that DeltaW_i = s_i B_i A_i. Sums run in float64
and results are float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .types import module_of

Arrays = Mapping[str, np.ndarray]
LORA_A, LORA_B = ".lora_A", ".lora_B"
STACK_A, STACK_B = ".stack_A", ".stack_B"


def data_weights(num_examples: Sequence[float]) -> np.ndarray:
    """p_i = n_i / sum(n); raises ValueError on negative counts or a zero total."""
    counts = np.asarray(num_examples, dtype=np.float64)
    if counts.size == 0 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(
            f"example counts must be >= 0 with a positive total, got {counts.tolist()}"
        )
    return counts / counts.sum()


def weighted_average(
    updates: Sequence[Arrays], num_examples: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg: X <- sum_i p_i X_i for every key (Fed-ALoRA's B, FedIT's A and B,
    FedSA-LoRA's A). All updates must carry the same keys with the same shapes."""
    weights = data_weights(num_examples)
    keys = set(updates[0])
    for update in updates[1:]:
        if set(update) != keys:
            raise ValueError("updates carry different keys; cannot average")
    return {
        key: _f32(sum(w * _f64(u[key]) for w, u in zip(weights, updates, strict=True)))
        for key in updates[0]
    }


def accumulate_decomposed(
    b0: Arrays, updates: Sequence[Arrays], num_examples: Sequence[float]
) -> dict[str, np.ndarray]:
    """Heterogeneous Fed-ALoRA: B0 <- B0 + sum_i p_i B2_i @ B1_i, layer by layer.

    ``b0`` maps ``<module>.B0`` to d_out x d_m; each update maps ``<module>.B2``
    (d_out x r_i) and ``<module>.B1`` (r_i x d_m). Ranks may differ between updates:
    every product B2_i B1_i is d_out x d_m.
    """
    weights = data_weights(num_examples)
    result: dict[str, np.ndarray] = {}
    for key, current in b0.items():
        module = module_of(key)
        total = _f64(current).copy()
        for w, update in zip(weights, updates, strict=True):
            total += w * (_f64(update[f"{module}.B2"]) @ _f64(update[f"{module}.B1"]))
        result[key] = _f32(total)
    return result


# ------------------------------------------------------------------ zero padding
def truncate_rank(arrays: Arrays, rank: int, b_scale: float = 1.0) -> dict[str, np.ndarray]:
    """A client's share of padded factors: the first ``rank`` rows of every A and columns
    of every B (B multiplied by ``b_scale``)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(LORA_A):
            out[key] = np.ascontiguousarray(value[:rank])
        elif key.endswith(LORA_B):
            out[key] = _f32(_f64(value[:, :rank]) * b_scale)
        else:
            raise ValueError(f"'{key}' is not a LoRA factor (.lora_A / .lora_B)")
    return out


def zero_pad_average(
    updates: Sequence[Arrays],
    weights: Sequence[float] | Mapping[str, Sequence[float]],
    rank: int,
    slots: str,
) -> dict[str, np.ndarray]:
    """Average LoRA factors of different ranks, zero-padded to ``rank``.

    ``slots="holders"``: rank slot j (row j of A, column j of B) is averaged over the
    clients with r_i > j only, their weights renormalised over those clients.
    ``slots="all"``: X <- sum_i w_i pad(X_i), slots a client lacks count as zeros.
    ``weights`` (normalised here) is one vector, or one vector per module. Each update
    is added into its own slots; nothing is padded or copied per client.
    """
    if slots not in ("holders", "all"):
        raise ValueError(f"slots must be 'holders' or 'all', got {slots!r}")
    result: dict[str, np.ndarray] = {}
    for key in updates[0]:
        module, is_a = module_of(key), key.endswith(LORA_A)
        raw = weights[module] if isinstance(weights, Mapping) else weights
        w = data_weights(raw)
        ranks = np.array([_rank_of(u[key], key) for u in updates])
        if ranks.max() > rank:
            raise ValueError(f"'{key}' has rank {ranks.max()}, above the padding rank {rank}")
        first = updates[0][key]
        total = np.zeros((rank, first.shape[1]) if is_a else (first.shape[0], rank))
        for wi, update, r in zip(w, updates, ranks, strict=True):
            if is_a:
                total[:r] += wi * _f64(update[key])
            else:
                total[:, :r] += wi * _f64(update[key])
        if slots == "holders":
            mass = w @ (ranks[:, None] > np.arange(rank)[None, :])  # weight holding slot j
            per_slot = np.divide(1.0, mass, out=np.zeros(rank), where=mass > 0)
            total *= per_slot[:, None] if is_a else per_slot[None, :]
        result[key] = _f32(total)
    return result


def masked_average(
    factors: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    num_examples: Sequence[float],
    rank: int,
) -> np.ndarray:
    """LoRI's rule for one layer's B: entry (o, j) of the d_out x ``rank`` result is the
    average of B_i[o, j] over the clients whose mask keeps it (mask_i[o, j] set and
    j < r_i), their weights p_i renormalised over them; an entry no client keeps is 0.
    ``factors[i]`` and ``masks[i]`` are d_out x r_i; with one mask for every client the
    result is sum_i p_i B_i on it, so B A = sum_i p_i B_i A for a shared A."""
    weights = data_weights(num_examples)
    total = np.zeros((factors[0].shape[0], rank))
    mass = np.zeros_like(total)
    for w, factor, mask in zip(weights, factors, masks, strict=True):
        kept = np.asarray(mask, dtype=bool)
        r = factor.shape[1]
        total[:, :r] += w * np.where(kept, _f64(factor), 0.0)
        mass[:, :r] += w * kept
    return _f32(np.divide(total, mass, out=np.zeros_like(total), where=mass > 0))


def product_norm(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> float:
    """||s B A||_F from the r x r Gram matrices, without forming the d_out x d_in product."""
    a, b = _f64(a), _f64(b)
    return abs(scale) * float(np.sqrt(max(np.sum((b.T @ b) * (a @ a.T)), 0.0)))


def hetlora_average(
    updates: Sequence[Arrays], scales: Sequence[float], rank: int
) -> dict[str, np.ndarray]:
    """HetLoRA: zero-padding over all clients with per-layer weights w_i proportional to
    ||s_i B_i A_i||_F (equal weights for a layer where every update is zero)."""
    weights: dict[str, list[float]] = {}
    for module in modules_of(updates[0]):
        norms = [
            product_norm(u[module + LORA_A], u[module + LORA_B], s)
            for u, s in zip(updates, scales, strict=True)
        ]
        weights[module] = norms if sum(norms) > 0 else [1.0] * len(norms)
    return zero_pad_average(updates, weights, rank, slots="all")


# -------------------------------------------------------------- exact products
def lora_product_sum(
    updates: Sequence[Arrays], num_examples: Sequence[float], scales: Sequence[float], module: str
) -> np.ndarray:
    """The exact aggregate DeltaW = sum_i p_i s_i B_i A_i of one layer (dense, float64),
    as one product of the stacked factors."""
    stack_a, stack_b = _stack(updates, data_weights(num_examples), scales, module, np.float64)
    return stack_b @ stack_a


def flexlora_factors(
    updates: Sequence[Arrays], num_examples: Sequence[float], scales: Sequence[float], rank: int
) -> dict[str, np.ndarray]:
    """FlexLoRA: DeltaW = sum_i p_i s_i B_i A_i, SVD DeltaW = U S V^T, kept to ``rank``:
    lora_B = U[:, :rank] S[:rank] (scale included), lora_A = V^T[:rank].

    A client of rank r_i and scale s_i takes ``truncate_rank(result, r_i, 1 / s_i)``:
    the best rank-r_i approximation of DeltaW (Eckart-Young).
    """
    result: dict[str, np.ndarray] = {}
    for module in modules_of(updates[0]):
        u, s, vt = np.linalg.svd(
            lora_product_sum(updates, num_examples, scales, module), full_matrices=False
        )
        result[module + LORA_A] = _f32(vt[:rank])
        result[module + LORA_B] = _f32(u[:, :rank] * s[:rank])
    return result


def flora_stack(
    updates: Sequence[Arrays], num_examples: Sequence[float], scales: Sequence[float]
) -> dict[str, np.ndarray]:
    """FLoRA: stack A = [A_1; ...; A_K] (sum r_i x d_in) and B = [p_1 s_1 B_1, ...,
    p_K s_K B_K] (d_out x sum r_i), so that B A = sum_i p_i s_i B_i A_i exactly."""
    weights = data_weights(num_examples)
    result: dict[str, np.ndarray] = {}
    for module in modules_of(updates[0]):
        result[module + STACK_A], result[module + STACK_B] = _stack(
            updates, weights, scales, module, np.float32
        )
    return result


def _stack(
    updates: Sequence[Arrays],
    weights: np.ndarray,
    scales: Sequence[float],
    module: str,
    dtype: type,
) -> tuple[np.ndarray, np.ndarray]:
    """[A_1; ...; A_K] and [w_1 s_1 B_1, ..., w_K s_K B_K] of one layer, filled in place."""
    factors_a = [u[module + LORA_A] for u in updates]
    factors_b = [u[module + LORA_B] for u in updates]
    total = sum(a.shape[0] for a in factors_a)
    stack_a = np.empty((total, factors_a[0].shape[1]), dtype)
    stack_b = np.empty((factors_b[0].shape[0], total), dtype)
    offset = 0
    for w, s, a, b in zip(weights, scales, factors_a, factors_b, strict=True):
        r = a.shape[0]
        stack_a[offset : offset + r] = a
        stack_b[:, offset : offset + r] = (w * s) * _f64(b)
        offset += r
    return stack_a, stack_b


# ------------------------------------------------------------------- helpers
def modules_of(update: Arrays) -> list[str]:
    """The adapted modules named by an update's LoRA keys, in order."""
    modules = [module_of(k) for k in update if k.endswith((LORA_A, LORA_B))]
    return list(dict.fromkeys(modules))


def _rank_of(factor: np.ndarray, key: str) -> int:
    return factor.shape[0] if key.endswith(LORA_A) else factor.shape[1]


def _f64(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _f32(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)
