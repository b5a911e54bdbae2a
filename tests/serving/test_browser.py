"""The page in a real browser (headless Chromium), the server on a real socket, and a clean stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import _tiny

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'dogtl[serve]'")


@pytest.fixture(scope="module")
def server():
    from dogtl.serving.app import create_app
    from dogtl.serving.server import ServerThread

    with ServerThread(create_app(_tiny.serving_model())) as running:
        yield running


def _post(url, data: bytes):
    request = urllib.request.Request(url + "predict", data=data, headers={"content-type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_page_in_headless_chromium_shows_the_top_class(server):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    from dogtl.serving.browser import classify_in_page, find_chromium, headless_chromium

    if find_chromium() is None:
        pytest.skip("no headless browser: Chromium and chromedriver not found (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    image = _tiny.images()[1]
    want = [p["class"] for p in _post(server.url, image.read_bytes())["predictions"]]
    driver = headless_chromium()
    try:
        shown = classify_in_page(driver, server.url, image)
        assert driver.find_element("css selector", "#drop img").get_attribute("src").startswith("blob:")
    finally:
        driver.quit()
    assert shown == want and len(shown) == 4  # all 4 classes of the tiny model, best first


def _half_sent_request(port, data: bytes):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data[:200])
    return sock


def _finish(sock, data: bytes) -> tuple[int, dict]:
    sock.sendall(data[200:])
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_stop_finishes_the_request_in_flight():
    """What Ctrl-C/SIGTERM do in uvicorn (should_exit): a request half uploaded still gets its answer."""
    from dogtl.serving.app import create_app
    from dogtl.serving.server import ServerThread

    data = _tiny.images()[2].read_bytes()
    running = ServerThread(create_app(_tiny.serving_model())).__enter__()
    sock = _half_sent_request(running.port, data)
    time.sleep(0.3)
    running.server.should_exit = True
    time.sleep(0.3)
    assert running.thread.is_alive()  # waiting for the request in flight
    status, answer = _finish(sock, data)
    running.thread.join(30)
    assert status == 200 and answer["predictions"][0]["class"] in _tiny.CLASSES
    assert not running.thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2)


@pytest.mark.slow  # a second TensorFlow process: ~30 s on 2 cores
def test_dogtl_serve_process_stops_cleanly_on_sigterm(tmp_path):
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", "dogtl.cli", "serve", str(_tiny.model_path()), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
                time.sleep(0.5)
        data = _tiny.images()[0].read_bytes()
        sock = _half_sent_request(port, data)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, answer = _finish(sock, data)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 200 and len(answer["predictions"]) == 4
    assert proc.returncode == 0, err
    assert "serving tiny" in out and "stopped" in out
