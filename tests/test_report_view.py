"""The HTML report, and Netron: `qdq view` serves the model; headless Chromium finds a QuantizeLinear on the page."""

from __future__ import annotations

import base64
import http.server
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from html.parser import HTMLParser

import pytest
from conftest import DIGITS

import qdq
from qdq import report as report_module
from qdq.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Structure(HTMLParser):
    """Checks that every non-void element is closed in order, and collects the images."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def parse_html(text: str) -> Structure:
    parser = Structure()
    parser.feed(text)
    parser.close()
    return parser


def test_quantize_report_is_valid_html_with_embedded_histograms(tmp_path, capsys):
    out, report = tmp_path / "m.onnx", tmp_path / "report.html"
    assert main(["quantize", str(DIGITS / "digits.onnx"), "--calib", str(DIGITS / "calib.npz"), "--eval",
                 str(DIGITS / "eval.npz"), "-o", str(out), "--report", str(report), "-q"]) == 0
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Float vs int8" in text and "relu_2" in text
    page = parse_html(text)
    assert page.errors == [] and page.stack == []
    assert len(page.images) == 6, "one histogram per calibrated tensor"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_report_has_its_chart(tmp_path):
    result = qdq.sensitivity(DIGITS / "digits.onnx", DIGITS / "calib.npz", DIGITS / "eval.npz")
    path = report_module.write_report(tmp_path / "s.html", title="s", sensitivity=result)
    page = parse_html(path.read_text())
    assert page.errors == [] and len(page.images) == 1
    assert all(layer.node in path.read_text() for layer in result.layers)


def test_report_without_matplotlib_keeps_the_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "pyplot", lambda: None)
    ranges = qdq.calibrate(DIGITS / "digits.onnx", DIGITS / "calib.npz")
    text = report_module.write_report(tmp_path / "r.html", title="r", ranges=ranges).read_text()
    assert 'pip install "qdq[report]"' in text and "<img" not in text and "relu_2" in text


def test_view_without_netron_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "netron", None)
    assert main(["view", str(DIGITS / "digits.onnx"), "--no-browser"]) == 3
    assert "pip install 'qdq[view]'" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def consent_proxy(upstream: str) -> http.server.ThreadingHTTPServer:
    """Forwards to Netron's server and sets Netron's consent cookie, so no dialog stands before the graph."""

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with urllib.request.urlopen(upstream + self.path) as response:
                body = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", "consent=1; Path=/")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs Debian's chromium)")
def test_netron_page_shows_a_quantize_linear_node(tmp_path):
    netron = pytest.importorskip("netron", reason="netron is not installed (pip install 'qdq[view]')")
    model = tmp_path / "digits.qdq.onnx"
    qdq.quantize(DIGITS / "digits.onnx", DIGITS / "calib.npz").save(model)
    port = free_port()
    netron.start(str(model), address=("localhost", port), browse=False)
    proxy = consent_proxy(f"http://localhost:{port}")
    try:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             # Netron's page would reach for analytics hosts: only loopback resolves, so nothing leaves.
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
             f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--virtual-time-budget=20000", "--dump-dom",
             f"http://127.0.0.1:{proxy.server_address[1]}/"],
            capture_output=True, text=True, timeout=120, check=False).stdout
    finally:
        proxy.shutdown()
        netron.stop()
    if "Please update to the newest version" in dom:
        pytest.skip("this netron build asks to be updated (older than 180 days) before it shows a graph")
    assert re.search(r">\s*QuantizeLinear\s*<", dom), "the graph on the Netron page has a QuantizeLinear node"
    assert "DequantizeLinear" in dom
