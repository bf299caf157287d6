"""Float vs quantized: per-output metrics, accuracy, and per-tensor error attribution, accumulated batch by batch."""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from tokenize import TokenError

import numpy as np
import onnx
from tqdm import tqdm

from qdq.calibrate.data import Dataset
from qdq.calibrate.npz import read_members
from qdq.errors import DataError, shown
from qdq.files import regular_file
from qdq.graph import GraphIndex
from qdq.model_io import first_line
from qdq.runtime import Session, make_session, quantized_session, session_exposing


@dataclass(frozen=True)
class OutputMetrics:
    """How far one quantized tensor is from the float one over the evaluation data.

    ``sqnr_db = 10·log10(Σ float² / Σ (float − quant)²)``; ``cosine`` the cosine similarity of the two as flat
    vectors; ``top1_agreement`` is set for ``[batch, classes]`` outputs: the share of samples with the same argmax.
    """

    name: str
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float = 0.0
    cosine: float = 1.0
    top1_agreement: float | None = None
    # Runs where float and quantized gave this output different shapes (a data-dependent length: detections above
    # a score threshold); the figures cover the other runs, and are NaN when there are none.
    shape_mismatches: int = 0
    integer: bool = False  # an integer output (class ids, indices): SQNR says little, so nothing warns on it


@dataclass(frozen=True)
class Comparison:
    outputs: tuple[OutputMetrics, ...]
    samples: int
    float_accuracy: float | None = None
    quant_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {"samples": self.samples, "float_accuracy": self.float_accuracy,
                "quant_accuracy": self.quant_accuracy, "outputs": [vars(o) for o in self.outputs]}


class OutputAccumulator:
    """Running sums for one tensor's SQNR, cosine, errors and top-1 agreement (O(1) memory)."""

    def __init__(self) -> None:
        self.signal = self.noise = self.test_energy = self.dot = self.abs_sum = self.max_abs = 0.0
        self.count = self.agree = self.rows = self.mismatches = self.matched = 0
        self.integer = False

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if np.shape(ref) != np.shape(test):
            self.mismatches += 1
            return
        self.matched += 1
        self.integer = not np.issubdtype(np.asarray(ref).dtype, np.floating)
        ref64, test64 = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
        diff = ref64 - test64
        self.signal += float(ref64 @ ref64)
        self.test_energy += float(test64 @ test64)
        self.dot += float(ref64 @ test64)
        self.noise += float(diff @ diff)
        self.abs_sum += float(np.abs(diff).sum())
        self.count += diff.size
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()) if diff.size else 0.0)
        if is_classifier_output(ref):
            self.agree += int(np.sum(ref.argmax(-1) == test.argmax(-1)))
            self.rows += ref.shape[0]

    def metrics(self, name: str) -> OutputMetrics:
        if self.mismatches and not self.matched:
            return OutputMetrics(name, math.nan, math.nan, math.nan, math.nan, None, self.mismatches, self.integer)
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        norms = math.sqrt(self.signal * self.test_energy)
        cosine = self.dot / norms if norms else (1.0 if self.noise == 0 else 0.0)
        return OutputMetrics(name, sqnr, self.max_abs, self.abs_sum / max(self.count, 1), cosine,
                             self.agree / self.rows if self.rows else None, self.mismatches, self.integer)


def worst_sqnr(outputs: list[OutputMetrics] | tuple[OutputMetrics, ...]) -> float:
    """The lowest SQNR of the float outputs, for keep-or-drop checks; NaN when one is NaN from non-finite values
    (nothing can be decided) or none could be compared. Integer outputs (token ids, lengths) do not count: one
    flipped id reads as 0.4 dB. Nor does an output whose shapes never agreed (detections above a threshold)."""
    values = [o.sqnr_db for o in outputs if not o.integer and not (math.isnan(o.sqnr_db) and o.shape_mismatches)]
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return min(values)


def is_classifier_output(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1 and np.issubdtype(x.dtype, np.floating)


def run(session: Session, names: list[str], batch, data: Dataset, run_number: int, what: str) -> list[np.ndarray]:
    try:
        return session.run(names, batch.feeds)
    except Exception as exc:  # ORT's InvalidArgument / Fail
        raise DataError(f"{data.name}: {what} failed on batch {run_number}: {first_line(exc)}") from exc


def compare_models(float_model: onnx.ModelProto | Session, quant_model: onnx.ModelProto, data: Dataset,
                   labels: np.ndarray | None = None, *, progress: bool = False) -> Comparison:
    """Run both models on ``data`` with ONNX Runtime (CPU) and measure each output's error.

    ``float_model`` may be a session already made (sensitivity analysis compares many quantized models with
    one float model). With ``labels`` (one class index per sample, in data order), the argmax of the first output
    gives the accuracy of both models.
    """
    float_session = float_model if isinstance(float_model, Session) else make_session(float_model,
                                                                                       what="the float model")
    quant_session = quantized_session(quant_model)
    names = [o.name for o in float_session.get_outputs()]
    accumulators = {name: OutputAccumulator() for name in names}
    predictions: dict[str, list[np.ndarray]] = {"float": [], "quant": []}
    samples = 0
    batches = tqdm(data, total=data.runs(), desc="comparing", unit="batch", disable=None if progress else True,
                   leave=False)
    for number, batch in enumerate(batches, start=1):
        ref = run(float_session, names, batch, data, number, "the float model")
        test = run(quant_session, names, batch, data, number, "the quantized model")
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


@dataclass(frozen=True)
class TensorError:
    """The error one Q/DQ pair adds (``local``: its output against its own input in the quantized model), the
    error accumulated up to it (``total``: its output against the same tensor in the float model), and its worst
    channel: one scale per tensor is shared by all channels, so a channel far smaller than the largest one loses
    its resolution, which the tensor-wide SQNR (dominated by the large channels) hides."""

    tensor: str
    local: OutputMetrics
    total: OutputMetrics
    worst_channel: int = 0
    worst_channel_db: float = math.inf


class ChannelAccumulator:
    """Per-channel signal and noise energy (axis 1 of 4-D/5-D tensors, else the last axis)."""

    def __init__(self) -> None:
        self.signal: np.ndarray | None = None
        self.noise: np.ndarray | None = None

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.ndim == 0:
            return
        axis = 1 if ref.ndim in (4, 5) else ref.ndim - 1
        others = tuple(i for i in range(ref.ndim) if i != axis)
        ref64, diff = ref.astype(np.float64), ref.astype(np.float64) - test.astype(np.float64)
        signal, noise = (ref64 * ref64).sum(axis=others), (diff * diff).sum(axis=others)
        self.signal = signal if self.signal is None else self.signal + signal
        self.noise = noise if self.noise is None else self.noise + noise

    def worst(self) -> tuple[int, float]:
        if self.signal is None:
            return 0, math.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            db = np.where(self.noise > 0, 10 * np.log10(np.maximum(self.signal, 1e-300) / self.noise), np.inf)
        index = int(np.argmin(db))
        return index, float(db[index])


def attribute_error(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, data: Dataset, *,
                    progress: bool = False) -> list[TensorError]:
    """For every quantized activation, how much error its Q/DQ adds and how much has accumulated, worst first
    (ranked by the SQNR of its worst channel).

    Both models run side by side with the tensors exposed; statistics stream, nothing is kept across batches.
    """
    pairs = qdq_pairs(quant_model)
    float_names = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    pairs = [(t, dq) for t, dq in pairs if t in float_names]
    if not pairs:
        return []
    tensors = [t for t, _ in pairs]
    inputs = {i.name for i in float_model.graph.input}
    exposed = [t for t in tensors if t not in inputs]  # graph inputs come from the feeds
    dequantized_names = [dq for _, dq in pairs]
    float_session = session_exposing(float_model, exposed, what="the float model") if exposed else None
    quant_session = quantized_session(quant_model, exposed + dequantized_names)
    local = {t: OutputAccumulator() for t in tensors}
    total = {t: OutputAccumulator() for t in tensors}
    channels = {t: ChannelAccumulator() for t in tensors}
    batches = tqdm(data, total=data.runs(), desc="attributing", unit="batch", disable=None if progress else True,
                   leave=False)
    for number, batch in enumerate(batches, start=1):
        ref = dict(batch.feeds)
        if float_session is not None:
            ref.update(zip(exposed, run(float_session, exposed, batch, data, number, "the float model"), strict=True))
        values = run(quant_session, exposed + dequantized_names, batch, data, number, "the quantized model")
        own = dict(batch.feeds) | dict(zip(exposed, values[:len(exposed)], strict=True))
        for (tensor, _), dequantized in zip(pairs, values[len(exposed):], strict=True):
            local[tensor].update(own[tensor], dequantized)
            total[tensor].update(ref[tensor], dequantized)
            channels[tensor].update(own[tensor], dequantized)
    # A tensor SmoothQuant rescaled holds x/s in the quantized model and x in the float one: its accumulated error
    # against the float tensor of that name would measure the rescaling. Its Q says so in its doc string.
    rescaled = {n.input[0] for n in quant_model.graph.node
                if n.op_type == "QuantizeLinear" and "smoothquant" in n.doc_string}
    found = [TensorError(t, local[t].metrics(t), OutputMetrics(t, math.nan, math.nan) if t in rescaled
                         else total[t].metrics(t), *channels[t].worst()) for t in tensors]
    return sorted(found, key=lambda e: (e.worst_channel_db, e.local.sqnr_db))


def qdq_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(activation tensor, output of its DequantizeLinear) for every activation Q/DQ pair."""
    index = GraphIndex(model)
    pairs = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and not index.is_constant(node.input[0]):
            dq = next((r for r in index.consumers(node.output[0]) if r.op_type == "DequantizeLinear"), None)
            if dq is not None:
                pairs.append((node.input[0], dq.output[0]))
    return pairs


def class_predictions(output: np.ndarray) -> np.ndarray:
    return output.reshape(-1, output.shape[-1]).argmax(-1) if output.ndim else output.reshape(1)


LABELS_BYTES_LIMIT = 1 << 30  # labels are one integer a sample: more is a damaged or hostile file


def load_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Integer class labels from a ``.npy`` file (or the only array of an ``.npz``), as a 1-D array.

    A FIFO or device is refused unopened; an ``.npz`` member's declared size is checked before it is inflated.
    """
    path = regular_file(path, "labels")
    try:
        if zipfile.is_zipfile(path):
            members = read_members(path)
            if len(members) != 1:
                raise DataError(f"{path}: expected one labels array, found {sorted(map(shown, members))}")
            if (member := next(iter(members.values()))).nbytes > LABELS_BYTES_LIMIT:
                raise DataError(f"{path}: the labels array declares {member.nbytes / 2**30:.3g} GiB; qdq's limit is "
                                f"{LABELS_BYTES_LIMIT / 2**30:g} GiB")
            with np.load(path, allow_pickle=False) as archive:
                loaded = archive[archive.files[0]]
        else:
            loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError, SyntaxError, TokenError, RecursionError, MemoryError, TypeError) as exc:
        raise DataError(f"{path}: cannot read labels ({type(exc).__name__}: {first_line(exc)[:200]})") from exc
    if not np.issubdtype(loaded.dtype, np.integer):
        raise DataError(f"{path}: labels must be integer class indices, found {loaded.dtype}")
    return np.array(loaded).reshape(-1)
