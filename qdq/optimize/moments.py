"""The first and second moments of each layer's input patches, streamed over the calibration data.

Measured through the quantized model (its Q/DQ activations and quantized upstream weights), so that each layer
is corrected for the inputs it will see once deployed ("empirical" bias correction), not the float model's.
Each statistic is O(K²) per group and mergeable; layers are observed a few at a time so that the exposed
activations and the Gram matrices stay within a fixed budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from qdq.calibrate.data import Batch, Dataset, per_sample
from qdq.errors import DataError
from qdq.model_io import first_line
from qdq.optimize.layers import Layer
from qdq.runtime import session_exposing

log = logging.getLogger(__name__)

# Gram matrices held at once (float64 bytes); a model with more is observed in several passes.
GRAM_BUDGET_BYTES = 256 << 20
# Patches per layer and batch that enter the Gram matrix (a random, seeded subset above this): the mean uses all.
GRAM_ROWS_PER_BATCH = 256


@dataclass
class Moments:
    """Count, sum and (optionally) Gram matrix of a layer's input patches, per group."""

    count: int = 0
    total: np.ndarray | None = None  # [groups, K]
    # Per-sample output shifts ΔW·mean(patch of sample i), when ΔW is known: their count, sum and sum of squares.
    samples: int = 0
    shift_sum: np.ndarray | None = None
    shift_squares: np.ndarray | None = None
    gram_rows: int = 0
    gram: np.ndarray | None = None  # [groups, K, K]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def update(self, layer: Layer, x: np.ndarray, *, with_gram: bool, delta: np.ndarray | None = None,
               samples: int = 1) -> None:
        """Add a batch of ``samples`` samples; with ``delta`` (ΔW as ``[groups, N, K]``) also each sample's output
        shift."""
        if delta is None:
            total, rows = layer.patch_sum(x)
            self.total = total if self.total is None else self.total + total
            self.count += rows
        else:
            for sample in per_sample(x, samples):
                total, rows = layer.patch_sum(sample)
                self.total = total if self.total is None else self.total + total
                self.count += rows
                shift = np.einsum("gnk,gk->gn", delta, total / max(rows, 1)).reshape(-1)
                self.shift_sum = shift if self.shift_sum is None else self.shift_sum + shift
                self.shift_squares = shift ** 2 if self.shift_squares is None else self.shift_squares + shift ** 2
                self.samples += 1
        if with_gram:
            patches = layer.patches(x, GRAM_ROWS_PER_BATCH, self.rng)
            gram = patches.transpose(0, 2, 1) @ patches
            self.gram = gram if self.gram is None else self.gram + gram
            self.gram_rows += patches.shape[1]

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def shift_error(self) -> np.ndarray | None:
        """The standard error of the mean per-sample shift, per channel (None below 3 samples)."""
        if self.samples < 3:
            return None
        mean = self.shift_sum / self.samples
        variance = np.maximum(self.shift_squares / self.samples - mean ** 2, 0.0) * self.samples / (self.samples - 1)
        return np.sqrt(variance / self.samples)

    def second(self) -> np.ndarray:
        """``E[patch patch^T]`` per group."""
        return self.gram / max(self.gram_rows, 1)


def collect_moments(quantized: onnx.ModelProto, layers: list[Layer], data: Dataset, *,
                    with_gram: bool, deltas: dict[str, np.ndarray] | None = None,
                    on_outputs: Callable[[Batch, dict[str, np.ndarray]], None] | None = None) -> dict[str, Moments]:
    """Moments of each layer's input in ``quantized`` (a Q/DQ model whose node names are the layers').

    ``on_outputs`` receives each batch of the first pass with ``quantized``'s graph outputs on it: a check of the
    model's outputs rides along instead of running the (unoptimised, slow) model again.
    """
    inputs = {n.name: n.input[0] for n in quantized.graph.node if n.input}
    moments = {layer.node: Moments() for layer in layers}
    groups = list(budgeted(layers, with_gram))
    if len(groups) > 1 and not data.rereadable():
        raise DataError("the weight techniques need data that can be read more than once for this model "
                        "(a file, a folder, a list); a one-shot iterator was given")
    graph_inputs = {i.name for i in quantized.graph.input}
    for index, group in enumerate(groups):
        names = sorted({inputs[layer.node] for layer in group} - graph_inputs)
        outputs = [o.name for o in quantized.graph.output] if on_outputs is not None and index == 0 else []
        wanted = list(dict.fromkeys(names + outputs))
        session = session_exposing(quantized, wanted, optimize=False, what="the quantized model") if wanted else None
        for number, batch in enumerate(data, start=1):
            try:
                values = dict(zip(wanted, session.run(wanted, batch.feeds), strict=True)) if session else {}
            except Exception as exc:  # ORT's InvalidArgument / Fail
                raise DataError(f"ONNX Runtime failed on batch {number} of {data.name}: {first_line(exc)}") from exc
            if outputs:
                on_outputs(batch, {name: values[name] for name in outputs})
            for layer in group:
                name = inputs[layer.node]
                x = values[name] if name in values else batch.feeds[name]
                moments[layer.node].update(layer, x, with_gram=with_gram,
                                            delta=None if deltas is None else deltas[layer.node],
                                            samples=batch.samples)
    log.debug("measured the inputs of %d layers in %d passes", len(layers), len(groups))
    return moments


def budgeted(layers: list[Layer], with_gram: bool):
    """Consecutive groups of layers whose Gram matrices fit the budget together (each at least one layer)."""
    group: list[Layer] = []
    used = 0
    for layer in layers:
        cost = gram_bytes(layer) if with_gram else 0
        if group and used + cost > GRAM_BUDGET_BYTES:
            yield group
            group, used = [], 0
        group.append(layer)
        used += cost
    if group:
        yield group


def gram_bytes(layer: Layer) -> int:
    return 8 * layer.groups * layer.features ** 2
