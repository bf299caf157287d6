"""One self-contained HTML report: comparison table, range histograms with the chosen amax, sensitivity chart.

Plots need matplotlib (``pip install "qdq[report]"``); without it the report has the tables and says what is
missing. Images are embedded as base64 PNG, so the file stands alone.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

from qdq.compare import Comparison, TensorError
from qdq.model_io import write_atomic
from qdq.ranges import TensorRanges
from qdq.sensitivity import SensitivityReport

MAX_HISTOGRAMS = 48  # the tensors clipped the most first; a report of a large model stays readable

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%}.note{color:#666}"""


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def figure_html(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell if isinstance(cell, str) else f'{cell:.4g}')}</td>"
                                    for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def comparison_section(comparison: Comparison) -> str:
    rows = [[o.name, o.sqnr_db, f"{o.cosine:.6f}", o.max_abs_error, o.mean_abs_error,
             "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"] for o in comparison.outputs]
    text = table(["output", "SQNR dB", "cosine", "max abs err", "mean abs err", "top-1 agree"], rows)
    if comparison.float_accuracy is not None and comparison.quant_accuracy is not None:
        text += (f"<p>accuracy: float {100 * comparison.float_accuracy:.2f}%, int8 "
                 f"{100 * comparison.quant_accuracy:.2f}% on {comparison.samples} samples</p>")
    return f"<h2>Float vs int8</h2>{text}"


def ranges_section(ranges: TensorRanges, plt) -> str:
    rows = [[name, ranges.amax[name], ranges.scale(name),
             ranges.histograms[name].amax if name in ranges.histograms else ranges.amax[name], ranges.source(name)]
            for name in ranges]
    text = f"<h2>Ranges ({html.escape(ranges.method)}, {ranges.samples} samples)</h2>"
    text += table(["tensor", "amax", "scale", "max |x| seen", "chosen by"], rows)
    if not ranges.histograms:
        return text + '<p class="note">No histograms: max calibration keeps only the maximum.</p>'
    if plt is None:
        return text + '<p class="note">Histograms need matplotlib: pip install "qdq[report]".</p>'
    clipped = sorted(ranges.histograms, key=lambda n: ranges.amax[n] / max(ranges.histograms[n].amax, 1e-30))
    for name in clipped[:MAX_HISTOGRAMS]:
        hist = ranges.histograms[name]
        edges = hist.edges()
        fig = plt.figure(figsize=(6, 2.2))
        ax = fig.add_subplot()
        used = max(int(np.flatnonzero(hist.counts).max(initial=0)) + 1, 1)
        ax.bar(edges[:used], hist.counts[:used], width=edges[1] - edges[0], align="edge", log=True,
               color="#4a7ab5")
        ax.set_ylim(bottom=0.5)
        ax.axvline(ranges.amax[name], color="#d33", label=f"amax {ranges.amax[name]:.4g}")
        ax.axvline(hist.amax, color="#888", linestyle="--", label=f"max {hist.amax:.4g}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("|x|")
        ax.legend(fontsize=7)
        text += figure_html(fig, f"histogram of {name}")
        plt.close(fig)
    return text


def sensitivity_section(report: SensitivityReport, plt) -> str:
    rows = [[layer.node, layer.op, layer.only_db, layer.without_db, layer.without_db - report.all_db]
            for layer in report.layers]
    text = (f"<h2>Sensitivity</h2><p>{html.escape(report.output)}: {report.all_db:.2f} dB with every layer "
            "quantized</p>")
    if plt is not None and report.layers:
        fig = plt.figure(figsize=(7, 0.3 * len(report.layers) + 1))
        ax = fig.add_subplot()
        ax.barh([x.node for x in report.layers][::-1], [x.without_db - report.all_db for x in report.layers][::-1],
                color="#4a7ab5")
        ax.set_xlabel("SQNR gain when left float (dB)")
        text += figure_html(fig, "sensitivity")
        plt.close(fig)
    return text + table(["layer", "op", "only this dB", "all but this dB", "gain dB"], rows)


def attribution_section(errors: list[TensorError]) -> str:
    rows = [[e.tensor, e.local.sqnr_db, e.worst_channel, e.worst_channel_db, e.total.sqnr_db] for e in errors]
    return ("<h2>Quantized tensors adding the most error</h2>"
            + table(["tensor", "added dB", "worst channel", "worst channel dB", "accumulated dB"], rows))


def write_report(path: str | os.PathLike[str], *, title: str, comparison: Comparison | None = None,
                 ranges: TensorRanges | None = None, sensitivity: SensitivityReport | None = None,
                 attribution: list[TensorError] | None = None, notes: tuple[str, ...] = ()) -> Path:
    """Write the report atomically; every section is optional."""
    plt = pyplot()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if plt is None:
        parts.append('<p class="note">Plots need matplotlib: pip install "qdq[report]".</p>')
    parts.extend(f"<p>{html.escape(note)}</p>" for note in notes)
    if comparison is not None:
        parts.append(comparison_section(comparison))
    if attribution:
        parts.append(attribution_section(attribution))
    if sensitivity is not None:
        parts.append(sensitivity_section(sensitivity, plt))
    if ranges is not None:
        parts.append(ranges_section(ranges, plt))
    parts.append("</body></html>")
    return write_atomic(Path(path), "\n".join(parts).encode("utf-8"))
