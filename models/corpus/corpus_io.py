"""Shared pieces of the corpus export scripts: seeded initialisation, export, data files and the json record.

The corpus format (one NAME per model, next to this file): ``NAME.onnx``, ``NAME.calib.npz`` and
``NAME.eval.npz`` (8 samples each, different seeds, keyed by graph input name) and ``NAME.json`` (what the model
imitates, how it was exported, and the SQNR floors the corpus test holds it to). Floors are measured by
``models/corpus/floors.py`` (which needs qdq, not torch); a rerun of an export keeps the floors already recorded.

Needs torch and onnxscript (``/work/venv-models``); qdq and its tests do not.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import torch
from torch import nn

OUT = Path(__file__).resolve().parent
SAMPLES = 8
CALIB_SEED, EVAL_SEED = 101, 202
MAX_BYTES = 3 << 20
DYNAMO_NATIVE_OPSET = 18


def he_init(module: nn.Module, seed: int) -> None:
    """He (fan-in) normal weights for convolutions and linears; norm layers get non-trivial affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else m.weight[:, 0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def settle_batchnorm(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> None:
    """Running statistics from real forward passes (cumulative average), so activations are normalised as in a
    trained network rather than by the identity statistics (mean 0, var 1) a fresh BatchNorm holds."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for args in batches:
            model(*args)
    model.eval()


def images(seed: int, n: int, channels: int = 3, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Image-like data: smooth random fields (low-resolution noise upsampled) plus fine noise, ImageNet-normalised
    in range (about -2..2.5), so neighbouring pixels correlate as in photographs."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.standard_normal((n, channels, size[0] // 8, size[1] // 8), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False).numpy()
    fine = rng.standard_normal((n, channels, *size), dtype=np.float32) * 0.3
    return np.clip(smooth + fine, -2.1, 2.6).astype(np.float32)


def export(model: nn.Module, args: tuple[torch.Tensor, ...], name: str, *, opset: int, dynamo: bool,
           input_names: list[str], output_names: list[str], batch_axes: dict[str, int] | None = None) -> Path:
    """Export with one of torch's two ONNX exporters; ``batch_axes``: the inputs/outputs whose axis is dynamic."""
    path = OUT / f"{name}.onnx"
    model.eval()
    dynamic = {k: {v: "batch"} for k, v in (batch_axes or {}).items()} or None
    # torch 2.13's dynamo exporter writes opset 18 and converts up itself, leaving ops newer than 18 (Gelu) under
    # an opset-18 header; past 18 it exports at 18 and ONNX's version converter raises the opset, as users do.
    first = min(opset, DYNAMO_NATIVE_OPSET) if dynamo else opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=dynamo, opset_version=first, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, external_data=False)
    model_proto = onnx.load(str(path))
    if first != opset:
        model_proto = onnx.version_converter.convert_version(model_proto, opset)
        onnx.save(model_proto, str(path))
    onnx.checker.check_model(model_proto, full_check=True)
    return path


def save_data(name: str, calib: dict[str, np.ndarray], evaluation: dict[str, np.ndarray]) -> None:
    np.savez(OUT / f"{name}.calib.npz", **calib)
    np.savez(OUT / f"{name}.eval.npz", **evaluation)


def write_record(name: str, *, family: str, imitates: str, exporter: str, weights: str) -> None:
    """The json record; floors already measured for this model are kept (``floors.py`` sets them)."""
    path = OUT / f"{name}.json"
    model = onnx.load(str(OUT / f"{name}.onnx"))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    old = json.loads(path.read_text()) if path.exists() else {}
    size = (OUT / f"{name}.onnx").stat().st_size
    assert size <= MAX_BYTES, f"{name}.onnx is {size} bytes, over the corpus limit"
    record = {"name": name, "family": family, "imitates": imitates, "exporter": exporter, "opset": opset,
              "weights": weights, "min_sqnr_db": old.get("min_sqnr_db", {}), "why_floor": old.get("why_floor", "")}
    for key in ("openvino_exceptions",):
        if key in old:
            record[key] = old[key]
    path.write_text(json.dumps(record, indent=1) + "\n")


def stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Whole model inputs stacked on a new axis 0 (qdq's layout for fixed-batch or stateful models)."""
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
