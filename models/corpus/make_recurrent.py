"""Corpus recurrent audio models: stateful, batch 1, the recurrent state a graph input and output.

- ``lstm_vad``: a Silero-VAD-style voice-activity model: a 256-sample audio chunk, a strided Conv1d front end,
  a 2-layer LSTM whose ``h``/``c`` come in and go out, a Linear + Sigmoid speech probability. TorchScript,
  opset 17.
- ``gru_kws``: a keyword-spotting-style model: 10 frames of 40 log-mel features, Linear, a GRU with its state in
  and out, Linear head over 12 keywords for every frame. TorchScript, opset 13.

The data is what a stream gives: consecutive chunks of one synthetic recording (tones, noise bursts, silence),
each sample's state the one the model returned for the chunk before, stacked whole-input by whole-input (qdq's
"one rank more" layout: ``audio`` [8, 1, 256], ``h`` [8, 2, 1, 64]...).

Run: ``/work/venv-models/bin/python models/corpus/make_recurrent.py [NAME ...]``. Seeded.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from corpus_io import CALIB_SEED, EVAL_SEED, SAMPLES, export, he_init, save_data, stack, write_record
from torch import nn
from torch.nn import functional as F  # noqa: N812

CHUNK, FRAMES, MELS = 256, 10, 40


class LstmVad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(1, 32, 16, 8, 4), nn.ReLU(), nn.Conv1d(32, 64, 3, 2, 1), nn.ReLU())
        self.lstm = nn.LSTM(64, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, audio, h, c):
        features = self.front(audio.unsqueeze(1)).transpose(1, 2)  # [1, steps, 64]
        out, (hn, cn) = self.lstm(features, (h, c))
        return torch.sigmoid(self.head(out[:, -1])), hn, cn


class GruKws(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(MELS, 64)
        self.gru = nn.GRU(64, 64, batch_first=True)
        self.out = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 12))

    def forward(self, features, state):
        out, state_out = self.gru(F.relu(self.inp(features)), state)
        return self.out(out), state_out


def recording(seed: int, chunks: int) -> np.ndarray:
    """A 16 kHz-like signal: tone bursts with harmonics, noise bursts and near-silence, chunk after chunk."""
    rng = np.random.default_rng(seed)
    t = np.arange(chunks * CHUNK, dtype=np.float64)
    signal = np.zeros_like(t)
    for start in range(0, len(t), CHUNK):
        kind, span = rng.integers(3), slice(start, start + CHUNK)
        if kind == 0:
            f = rng.uniform(0.01, 0.06)
            signal[span] = 0.4 * np.sin(2 * np.pi * f * t[span]) + 0.15 * np.sin(4 * np.pi * f * t[span])
        elif kind == 1:
            signal[span] = 0.2 * rng.standard_normal(CHUNK)
        signal[span] += 0.01 * rng.standard_normal(CHUNK)
    return signal.astype(np.float32)


def log_mels(seed: int, chunks: int) -> np.ndarray:
    """Log-mel-like frames [chunks, FRAMES, MELS]: smooth spectral envelopes moving slowly over time."""
    rng = np.random.default_rng(seed)
    envelope = np.cumsum(rng.standard_normal((chunks * FRAMES, MELS)) * 0.3, axis=0) * 0.2
    envelope += np.convolve(rng.standard_normal(MELS), np.ones(5) / 5, "same")
    return (envelope - envelope.mean()).reshape(chunks, FRAMES, MELS).astype(np.float32)


def stream(model: nn.Module, name: str, seed: int) -> dict[str, np.ndarray]:
    """SAMPLES consecutive whole inputs, each carrying the state the previous chunk returned."""
    samples = []
    with torch.no_grad():
        if name == "lstm_vad":
            audio = recording(seed, SAMPLES + 4).reshape(-1, 1, CHUNK)
            h, c = torch.zeros(2, 1, 64), torch.zeros(2, 1, 64)
            for chunk in audio:
                samples.append({"audio": chunk, "h": h.numpy().copy(), "c": c.numpy().copy()})
                _, h, c = model(torch.from_numpy(chunk), h, c)
        else:
            frames = log_mels(seed, SAMPLES + 4)
            state = torch.zeros(1, 1, 64)
            for chunk in frames:
                samples.append({"features": chunk[None], "state": state.numpy().copy()})
                _, state = model(torch.from_numpy(chunk[None]), state)
    return stack(samples[4:])  # the first chunks start from a zero state; keep the stream's steady state


RECURRENT = {
    "lstm_vad": (LstmVad, 17, "Silero-VAD-style voice activity (strided Conv1d front end, 2-layer LSTM with "
                 "h/c state in and out, Linear + Sigmoid)", ["audio", "h", "c"], ["speech", "hn", "cn"],
                 lambda: (torch.zeros(1, CHUNK), torch.zeros(2, 1, 64), torch.zeros(2, 1, 64))),
    "gru_kws": (GruKws, 13, "streaming keyword spotter (Linear, GRU with state in and out, per-frame Linear "
                "head)", ["features", "state"], ["logits", "state_out"],
                lambda: (torch.zeros(1, FRAMES, MELS), torch.zeros(1, 1, 64))),
}


def make(name: str) -> None:
    cls, opset, imitates, inputs, outputs, example = RECURRENT[name]
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    model = cls()
    he_init(model, seed)
    model.eval()
    export(model, example(), name, opset=opset, dynamo=False, input_names=inputs, output_names=outputs)
    save_data(name, stream(model, name, CALIB_SEED), stream(model, name, EVAL_SEED))
    write_record(name, family="recurrent", imitates=imitates, exporter="torch.onnx TorchScript",
                 weights=f"random (seed {seed}, He init; recurrent weights torch's default uniform)")


if __name__ == "__main__":
    for arg in sys.argv[1:] or RECURRENT:
        make(arg)
        print("wrote", arg)
