"""Export tiny transformer models, built from `transformers` configs with seeded random weights, to ONNX.

Writes, next to this script, for each model NAME the corpus files (see the corpus format in the README):
  NAME.onnx        the float export (<= 3 MB)
  NAME.calib.npz   8 calibration samples, keyed by graph input name, axis 0 the batch axis
  NAME.eval.npz    8 evaluation samples drawn with another seed
  NAME.json        what it imitates, the exporter, the opset and the SQNR floors the corpus test asserts

| model           | imitates                                         | exporter    | opset | inputs                 |
|-----------------|--------------------------------------------------|-------------|-------|------------------------|
| bert_minilm     | MiniLM/BERT sentence encoder, eager attention    | TorchScript | 13    | ids, mask, token types |
| gpt2_causal     | GPT-2 LM, no past key values (use_cache=False)   | dynamo      | 18    | ids, mask              |
| vit_tiny        | ViT image classifier                             | TorchScript | 17    | pixels                 |
| swin_tiny       | Swin classifier (shifted windows, relative bias) | TorchScript | 14    | pixels                 |
| whisper_encoder | Whisper audio encoder on log-mel features        | dynamo      | 27    | mel features           |
| wav2vec2_audio  | wav2vec2 on raw audio (conv feature stack)       | TorchScript | 17    | waveform               |
| llama_decoder   | Llama decoder (RMS norm, rotary, GQA, SwiGLU)    | dynamo      | 18    | ids, mask              |
| t5_encoder      | T5 encoder (RMS norm, relative position buckets) | TorchScript | 13    | ids, mask              |

Opset 27 is the newest opset whose QuantizeLinear/DequantizeLinear ONNX Runtime 1.32 implements (QuantizeLinear-25;
it loads opset-28 models but has no QuantizeLinear-28 kernel). At opset 23 and later the dynamo exporter writes
scaled-dot-product attention as ONNX's Attention op.

No weights are downloaded: every model is made from a config and initialised with ``torch.manual_seed``.
Needs torch, transformers and onnxscript (``/work/venv-models``); qdq itself does not. The SQNR floors in
NAME.json are measured with qdq (see FLOORS below); a re-export keeps them.
Run: ``python models/corpus/make_transformers.py [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import torch

OUT = Path(__file__).resolve().parent
SAMPLES = 8
CALIB_SEED, EVAL_SEED = 100, 200
VOCAB = 512
# Hugging Face initialises with std 0.02, which at hidden size 64 makes every sublayer's output ~0.16x its input:
# the residual stream would carry the embeddings almost untouched and quantization error would hide. 1/sqrt(64)
# keeps each sublayer's contribution comparable to the residual, as in trained models.
INIT_STD = 0.125
MAX_BYTES = 3 << 20
# torch 2.13's dynamo exporter writes opsets up to 25 itself; asked for more it silently writes 18 with newer
# ops (Gelu) in it. Past 25 the export is at 25 and ONNX's version converter raises it, as users do.
DYNAMO_MAX_OPSET = 25


@dataclass(frozen=True)
class Spec:
    """One corpus model: how to build it, its inputs, outputs and how it is exported."""

    name: str
    imitates: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[np.random.Generator, int], dict[str, np.ndarray]]
    outputs: tuple[str, ...]
    exporter: str  # "torchscript" or "dynamo"
    opset: int
    dynamic: dict[str, dict[int, str]]
    seed: int = 0


# ---------------------------------------------------------------- inputs


def padded_tokens(rng: np.random.Generator, count: int, length: int, *, min_length: int = 6, left: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (1..VOCAB-1, 0 is padding) and a padding mask: each sample has its own length, padded on the
    right (encoders) or on the left (decoders in batched generation)."""
    lengths = rng.integers(min_length, length + 1, size=count)
    lengths[0] = length  # one unpadded sample
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    if left:
        mask = mask[:, ::-1].copy()
    ids = rng.integers(1, VOCAB, size=(count, length)).astype(np.int64) * mask
    return ids, mask


def bert_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Sentence pairs: [CLS] a [SEP] b [SEP] with token type 0 then 1, right-padded."""
    ids, mask = padded_tokens(rng, count, 32, min_length=10)
    types = np.zeros_like(ids)
    for row, length in enumerate(mask.sum(1)):
        split = int(rng.integers(3, length - 2))
        ids[row, 0], ids[row, split - 1], ids[row, length - 1] = 101 % VOCAB, 102 % VOCAB, 102 % VOCAB
        types[row, split:length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def causal_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Left-padded, as batched generation pads: the padding's query rows see no key at all (fully masked)."""
    ids, mask = padded_tokens(rng, count, 24, left=True)
    return {"input_ids": ids, "attention_mask": mask}


def t5_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    ids, mask = padded_tokens(rng, count, 24)
    ids[np.arange(count), mask.sum(1) - 1] = 1  # </s> closes each sequence
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Normalised images: smooth random fields (not white noise), mean 0 std about 1 per channel."""
    coarse = rng.standard_normal((count, 3, 8, 8)).astype(np.float32)
    fine = np.kron(coarse, np.ones((1, 1, 4, 4), np.float32))
    return {"pixel_values": (fine + 0.3 * rng.standard_normal(fine.shape)).astype(np.float32)}


def mel_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Whisper-style log-mel features: clamped to max - 8, scaled (x + 4) / 4, so roughly in [-1, 1.5]."""
    t = np.arange(100)[None, None, :]
    f = np.arange(16)[None, :, None]
    tone = np.sin(t * rng.uniform(0.05, 0.4, (count, 1, 1)) + f * rng.uniform(0.1, 1.0, (count, 1, 1)))
    log_mel = tone * 2 + rng.standard_normal((count, 16, 100)) - 2
    log_mel = np.maximum(log_mel, log_mel.max(axis=(1, 2), keepdims=True) - 8.0)
    return {"input_features": ((log_mel + 4.0) / 4.0).astype(np.float32)}


def waveform_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """One second at 2 kHz-ish: a few tones in noise, normalised to zero mean and unit variance (as the
    feature extractor does)."""
    t = np.arange(1600)[None, :] / 1600.0
    freqs = rng.uniform(20, 300, (count, 3, 1))
    wave = np.sin(2 * np.pi * freqs * t[:, None, :]).sum(1) + 0.3 * rng.standard_normal((count, 1600))
    wave = (wave - wave.mean(1, keepdims=True)) / wave.std(1, keepdims=True)
    return {"input_values": wave.astype(np.float32)}


# ---------------------------------------------------------------- models


def bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    # Eager attention: the TorchScript exporter has no opset-13 SDPA, so this is the classic BERT export
    # (MatMul, Div by sqrt(d), Add of the mask, Softmax, MatMul).
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, type_vocab_size=2,
                        initializer_range=INIT_STD, attn_implementation="eager")

    class Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = BertModel(config)

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    return Bert()


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        initializer_range=INIT_STD, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)

    class GPT2(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT2LMHeadModel(config)

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return GPT2()


def vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256, num_labels=10, initializer_range=INIT_STD)

    class ViT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = ViTForImageClassification(config)

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    return ViT()


def swin() -> torch.nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                        window_size=4, num_labels=10, initializer_range=INIT_STD)

    class Swin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = SwinForImageClassification(config)

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    return Swin()


def whisper() -> torch.nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2,
                           encoder_attention_heads=4, encoder_ffn_dim=256, decoder_layers=1,
                           decoder_attention_heads=4, decoder_ffn_dim=256,
                           max_source_positions=50, max_target_positions=32, init_std=INIT_STD,
                           pad_token_id=VOCAB - 1, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                           decoder_start_token_id=VOCAB - 2)

    class Whisper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = WhisperEncoder(config)

        def forward(self, input_features):
            return self.model(input_features=input_features).last_hidden_state

    return Whisper()


def wav2vec2() -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, conv_dim=(32, 32, 32), conv_stride=(5, 4, 2),
                            conv_kernel=(10, 8, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            feat_extract_norm="group", do_stable_layer_norm=False, initializer_range=INIT_STD)

    class Wav2Vec2(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Wav2Vec2Model(config)

        def forward(self, input_values):
            return self.model(input_values=input_values).last_hidden_state

    return Wav2Vec2()


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                         initializer_range=INIT_STD, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    class Llama(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaModel(config)

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    return Llama()


def t5() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    # T5 scales its own init by d_model ** -0.5 already.
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", attn_implementation="eager")

    class T5(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = T5EncoderModel(config)

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return T5()


BATCH_AND_SEQUENCE = {0: "batch", 1: "sequence"}

SPECS = {spec.name: spec for spec in [
    Spec("bert_minilm", "MiniLM/BERT sentence encoder (Hugging Face BertModel): attention mask and token-type ids, "
         "last hidden state and pooler output", bert, bert_inputs, ("last_hidden_state", "pooler_output"),
         "torchscript", 13, {"input_ids": BATCH_AND_SEQUENCE, "attention_mask": BATCH_AND_SEQUENCE,
                             "token_type_ids": BATCH_AND_SEQUENCE, "last_hidden_state": BATCH_AND_SEQUENCE,
                             "pooler_output": {0: "batch"}}),
    Spec("gpt2_causal", "GPT-2 language model (Hugging Face GPT2LMHeadModel, tied embeddings), causal and padding "
         "masks, exported without past key values (use_cache=False)", gpt2, causal_inputs, ("logits",),
         "dynamo", 18, {"input_ids": BATCH_AND_SEQUENCE, "attention_mask": BATCH_AND_SEQUENCE}),
    Spec("vit_tiny", "ViT image classifier (Hugging Face ViTForImageClassification): patch Conv, CLS token, "
         "LayerNormalization op (opset 17)", vit, image_inputs, ("logits",), "torchscript", 17,
         {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}),
    Spec("swin_tiny", "Swin image classifier (Hugging Face SwinForImageClassification): windowed attention with a "
         "relative position bias table, shifted windows (roll as Slice+Concat, region mask by Equal and Where "
         "-100), patch merging", swin, image_inputs, ("logits",), "torchscript", 14,
         {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}),
    Spec("whisper_encoder", "Whisper audio encoder (Hugging Face WhisperEncoder): two Conv1d over log-mel features, "
         "GELU, sinusoidal positions", whisper, mel_inputs, ("last_hidden_state",), "dynamo", 27,
         {"input_features": {0: "batch"}}),
    Spec("wav2vec2_audio", "wav2vec2 on raw audio (Hugging Face Wav2Vec2Model): Conv1d feature stack with "
         "GroupNorm, grouped positional Conv1d, post-LN encoder", wav2vec2, waveform_inputs,
         ("last_hidden_state",), "torchscript", 17,
         {"input_values": {0: "batch"}, "last_hidden_state": {0: "batch"}}),
    Spec("llama_decoder", "Llama-style decoder (Hugging Face LlamaModel): RMS norm, rotary position embedding, "
         "grouped-query attention (4 query, 2 key/value heads), SiLU-gated MLP, causal and padding masks, no past "
         "key values", llama, causal_inputs, ("last_hidden_state",), "dynamo", 18,
         {"input_ids": BATCH_AND_SEQUENCE, "attention_mask": BATCH_AND_SEQUENCE}),
    Spec("t5_encoder", "T5 encoder (Hugging Face T5EncoderModel): RMS norm without mean, relative position "
         "buckets, gated GELU", t5, t5_inputs, ("last_hidden_state",), "torchscript", 13,
         {"input_ids": BATCH_AND_SEQUENCE, "attention_mask": BATCH_AND_SEQUENCE,
          "last_hidden_state": BATCH_AND_SEQUENCE}),
]}

EXPORTER_NAMES = {"torchscript": "torch.onnx TorchScript", "dynamo": "torch.onnx dynamo"}


# ---------------------------------------------------------------- export


def export(spec: Spec) -> Path:
    torch.manual_seed(spec.seed)
    model = spec.build().eval()
    example = spec.inputs(np.random.default_rng(spec.seed), 2)
    args = tuple(torch.from_numpy(v) for v in example.values())
    path = OUT / f"{spec.name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.exporter == "torchscript":
            torch.onnx.export(model, args, str(path), input_names=list(example), output_names=list(spec.outputs),
                              dynamic_axes=spec.dynamic, opset_version=spec.opset, dynamo=False)
        else:
            dims: dict[str, torch.export.Dim] = {}  # one Dim per name, so the inputs share batch and sequence
            shapes = {name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()}
                      for name, axes in spec.dynamic.items() if name in example}
            program = torch.onnx.export(model, args, input_names=list(example), output_names=list(spec.outputs),
                                        dynamic_shapes=shapes, opset_version=min(spec.opset, DYNAMO_MAX_OPSET),
                                        dynamo=True, external_data=False)
            program.save(str(path), external_data=False)
    if spec.opset > DYNAMO_MAX_OPSET:
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(path)), spec.opset), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    if (size := path.stat().st_size) > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over the corpus limit of {MAX_BYTES}")
    write_data(spec)
    check_export(model, path, spec)
    describe(spec)
    return path


def check_export(model: torch.nn.Module, path: Path, spec: Spec) -> None:
    """ONNX Runtime on the evaluation data agrees with PyTorch (the export is faithful)."""
    import onnxruntime as ort

    data = dict(np.load(OUT / f"{spec.name}.eval.npz"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, data)
    with torch.no_grad():
        want = model(*(torch.from_numpy(v) for v in data.values()))
    want = want if isinstance(want, tuple) else (want,)
    mask = data.get("attention_mask")
    for name, a, b in zip(spec.outputs, got, want, strict=True):
        b = b.numpy()
        if mask is not None and a.shape[:2] == mask.shape:
            # Padding positions: PyTorch and the export fill a fully masked attention row differently (both
            # garbage no one reads); compare the real tokens.
            a, b = a[mask == 1], b[mask == 1]
        error = float(np.abs(a - b).max())
        if error > 1e-4:
            raise SystemExit(f"{spec.name}: ONNX Runtime differs from PyTorch on {name} by {error}")


def write_data(spec: Spec) -> None:
    for suffix, seed in (("calib", CALIB_SEED), ("eval", EVAL_SEED)):
        data = spec.inputs(np.random.default_rng(seed), SAMPLES)
        np.savez(OUT / f"{spec.name}.{suffix}.npz", **data)


def describe(spec: Spec) -> None:
    """Write NAME.json; SQNR floors already recorded there are kept (they are measured with qdq, not here)."""
    path = OUT / f"{spec.name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    meta = {"name": spec.name, "family": "transformer", "imitates": spec.imitates,
            "exporter": EXPORTER_NAMES[spec.exporter], "opset": spec.opset,
            "weights": f"random (seed {spec.seed}, normal std {INIT_STD})",
            "min_sqnr_db": old.get("min_sqnr_db", {}), "why_floor": old.get("why_floor", "not measured yet")}
    path.write_text(json.dumps(meta, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to export (default: all of {', '.join(SPECS)})")
    args = parser.parse_args()
    if unknown := sorted(set(args.names) - set(SPECS)):
        parser.error(f"unknown models {unknown}; known: {', '.join(SPECS)}")
    for name in args.names or SPECS:
        path = export(SPECS[name])
        print(f"{name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
