"""Float vs quantized: per-output error metrics and accuracy, accumulated batch by batch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qdq.calibrate.data import Dataset
from qdq.errors import DataError
from qdq.model_io import first_line
from qdq.runtime import make_session


@dataclass(frozen=True)
class OutputMetrics:
    """How far one quantized output is from the float one over the evaluation data.

    ``sqnr_db = 10·log10(Σ float² / Σ (float − quant)²)``; ``top1_agreement`` is set for ``[batch, classes]``
    outputs: the share of samples whose argmax is the same.
    """

    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None = None


@dataclass(frozen=True)
class Comparison:
    outputs: tuple[OutputMetrics, ...]
    samples: int
    float_accuracy: float | None = None
    quant_accuracy: float | None = None


class OutputAccumulator:
    """Running sums for one output's SQNR, max error and top-1 agreement."""

    def __init__(self) -> None:
        self.signal = self.noise = self.max_abs = 0.0
        self.agree = self.rows = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref64, diff = ref.astype(np.float64), ref.astype(np.float64) - test.astype(np.float64)
        self.signal += float(np.sum(ref64 * ref64))
        self.noise += float(np.sum(diff * diff))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)
        if is_classifier_output(ref):
            self.agree += int(np.sum(ref.argmax(-1) == test.argmax(-1)))
            self.rows += ref.shape[0]

    def metrics(self, name: str) -> OutputMetrics:
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        return OutputMetrics(name, sqnr, self.max_abs, self.agree / self.rows if self.rows else None)


def is_classifier_output(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1 and np.issubdtype(x.dtype, np.floating)


def compare_models(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, data: Dataset,
                   labels: np.ndarray | None = None) -> Comparison:
    """Run both models on ``data`` with ONNX Runtime (CPU) and measure each output's error.

    With ``labels`` (one class index per sample, in data order), the argmax of the first output gives the
    accuracy of both models.
    """
    float_session = make_session(float_model, what="the float model")
    quant_session = make_session(quant_model, what="the quantized model")
    names = [o.name for o in float_session.get_outputs()]
    accumulators = {name: OutputAccumulator() for name in names}
    predictions: dict[str, list[np.ndarray]] = {"float": [], "quant": []}
    samples = 0
    for run, batch in enumerate(data, start=1):
        try:
            ref = float_session.run(names, batch.feeds)
        except Exception as exc:
            raise DataError(f"{data.name}: the float model failed on batch {run}: {first_line(exc)}") from exc
        try:
            test = quant_session.run(names, batch.feeds)
        except Exception as exc:
            raise DataError(f"{data.name}: the quantized model failed on batch {run}: {first_line(exc)}") from exc
        for name, r, t in zip(names, ref, test, strict=True):
            accumulators[name].update(r, t)
        if labels is not None:
            predictions["float"].append(class_predictions(ref[0]))
            predictions["quant"].append(class_predictions(test[0]))
        samples += batch.samples
    if samples == 0:
        raise DataError(f"{data.name}: no samples to evaluate on")
    outputs = tuple(accumulators[name].metrics(name) for name in names)
    if labels is None:
        return Comparison(outputs, samples)
    float_pred, quant_pred = (np.concatenate(predictions[k]) for k in ("float", "quant"))
    if len(float_pred) != len(labels):
        raise DataError(f"{len(labels)} labels for {len(float_pred)} predictions of output {names[0]!r}; "
                        "give one label per evaluated sample")
    return Comparison(outputs, samples, float(np.mean(float_pred == labels)), float(np.mean(quant_pred == labels)))


def class_predictions(output: np.ndarray) -> np.ndarray:
    return output.reshape(-1, output.shape[-1]).argmax(-1) if output.ndim else output.reshape(1)


def load_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Integer class labels from a ``.npy`` file (or the only array of an ``.npz``), as a 1-D array."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read labels ({first_line(exc)})") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if len(loaded.files) != 1:
                raise DataError(f"{path}: expected one labels array, found {loaded.files}")
            loaded = loaded[loaded.files[0]]
    if not np.issubdtype(loaded.dtype, np.integer):
        raise DataError(f"{path}: labels must be integer class indices, found {loaded.dtype}")
    return loaded.reshape(-1)
