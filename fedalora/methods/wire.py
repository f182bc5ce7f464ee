"""How an upload travels: the arrays a client sends for the dense factors its method
uploads (``Method.upload_shapes``), and what the server checks before and after it
reads them. Most methods send the factors as they are (``DENSE``); LoRI-S sends the
entries its mask keeps (``MaskedValues``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..screening import update_problem
from ..types import Arrays, Shapes


class UploadFormat:
    """The dense format: an upload is the method's arrays of ``dense`` shapes."""

    def shapes(self, dense: Shapes) -> Shapes:
        """The arrays an upload of ``dense`` factors sends (typical sizes)."""
        return dict(dense)

    def bounds(self, dense: Shapes) -> Shapes:
        """The largest shape each array may have: what the server checks before it
        reads a reply."""
        return self.shapes(dense)

    def zeros(self, dense: Shapes) -> Arrays:
        """A well-formed upload of zeros (for the server side without a model:
        communication accounting, benchmarks)."""
        return {k: np.zeros(s, np.float32) for k, s in self.shapes(dense).items()}

    def problem(self, dense: Shapes, update: Arrays) -> str | None:
        """Why ``update`` is not an upload of ``dense`` factors (keys, shapes, dtype,
        NaN/Inf), or None."""
        return update_problem(update, self.shapes(dense))


DENSE = UploadFormat()


@dataclass(frozen=True)
class MaskedValues(UploadFormat):
    """Each d_out x r factor ``<key>`` as the values of the entries its mask keeps
    (``<key>.values``, float32) and the mask packed 8 entries to a byte (``<key>.mask``);
    ``density`` is the mean share of entries kept (a client's share per layer varies)."""

    density: float

    def shapes(self, dense: Shapes) -> Shapes:
        shapes: Shapes = {}
        for key, (d_out, rank) in dense.items():
            shapes[f"{key}.values"] = (round(self.density * d_out * rank),)
            shapes[f"{key}.mask"] = (math.ceil(d_out * rank / 8),)
        return shapes

    def bounds(self, dense: Shapes) -> Shapes:
        """A factor's values are at most all of its d_out x r entries."""
        bounds = dict(self.shapes(dense))
        for key, (d_out, rank) in dense.items():
            bounds[f"{key}.values"] = (d_out * rank,)
        return bounds

    def zeros(self, dense: Shapes) -> Arrays:
        """The first round(density d_out r) entries of each factor kept."""
        upload: Arrays = {}
        for key, (d_out, rank) in dense.items():
            kept = np.zeros(d_out * rank, bool)
            kept[: self.shapes(dense)[f"{key}.values"][0]] = True
            upload[f"{key}.values"] = np.zeros(int(kept.sum()), np.float32)
            upload[f"{key}.mask"] = np.packbits(kept)
        return upload

    def problem(self, dense: Shapes, update: Arrays) -> str | None:
        expected = {f"{key}.{part}" for key in dense for part in ("values", "mask")}
        if set(update) != expected:
            missing, extra = sorted(expected - set(update)), sorted(set(update) - expected)
            return f"keys differ from a masked upload (missing {missing[:2]}, extra {extra[:2]})"
        for key, (d_out, rank) in dense.items():
            mask, values = update[f"{key}.mask"], update[f"{key}.values"]
            if mask.dtype != np.uint8 or mask.shape != (math.ceil(d_out * rank / 8),):
                return f"'{key}.mask' is not {d_out} x {rank} entries packed into uint8"
            kept = int(unpack(mask, (d_out, rank)).sum())
            problem = update_problem({f"{key}.values": values}, {f"{key}.values": (kept,)})
            if problem:
                return problem
        return None

    @staticmethod
    def encode(upload: Arrays, masks: Mapping[str, np.ndarray]) -> Arrays:
        """Each dense factor of ``upload`` as the values its boolean mask keeps (every
        entry where ``masks`` has none) and the packed mask."""
        encoded: Arrays = {}
        for key, dense in upload.items():
            kept = masks[key] if key in masks else np.ones(dense.shape, bool)
            encoded[f"{key}.values"] = dense[kept].astype(np.float32)
            encoded[f"{key}.mask"] = np.packbits(kept.ravel())
        return encoded

    @staticmethod
    def decode(update: Arrays, key: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(dense factor, boolean mask) of factor ``key`` of ``shape`` from an upload."""
        kept = unpack(update[f"{key}.mask"], shape)
        dense = np.zeros(shape, np.float32)
        dense[kept] = update[f"{key}.values"]
        return dense, kept


def unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask of ``shape`` from its bits packed 8 to a byte."""
    return np.unpackbits(packed)[: shape[0] * shape[1]].reshape(shape).astype(bool)
